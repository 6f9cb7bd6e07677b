"""Job messages across versions, with real Redis and real workers: a job in the first
format is still run, a job newer than a worker can read is answered, never dropped."""

from __future__ import annotations

import time

import pytest

from cleandift.service.queue.consumer import JobConsumer
from cleandift.service.queue.keys import Keys
from tests.service.service_helpers import WorkerThread, redis_client

pytestmark = pytest.mark.integration


def _wait_result(r, keys: Keys, job_id: str, timeout: float = 30):
    from cleandift.service.messages import Result

    deadline = time.monotonic() + timeout
    while not (fields := r.hgetall(keys.result(job_id))):
        assert time.monotonic() < deadline, "never answered"
        time.sleep(0.02)
    return Result.from_fields(fields)


def test_a_job_in_the_first_format_is_run_by_todays_worker(settings, extractor, photo):
    """What the first API wrote (no version field, `size` and `sizes`): still answered."""
    import numpy as np

    from cleandift.images import resize_rgb
    from cleandift.service.messages import Job, JobSpec

    settings = settings.model_copy(update={"result_transport": "redis"})  # read it here
    keys, r = Keys(settings.queue_prefix), redis_client(settings)
    spec = JobSpec(kind="features", input_size=256, layers=["us6"], image_sizes=[photo.size],
                   deadline=time.time() + 30)
    fields = Job(spec, [resize_rgb(photo, 256)]).to_fields(version=1)
    assert "v" in fields and fields["v"] == "1"
    del fields["v"]  # the first format had no version field at all
    with WorkerThread(settings, extractor):
        r.xadd(keys.jobs, fields)
        result = _wait_result(r, keys, spec.id)
    assert result.meta.status == 200 and result.array("us6").shape == (64, 16, 16)
    assert np.isfinite(result.array("us6")).all()


def test_a_job_in_a_newer_format_is_answered_by_an_older_worker(settings, photo):
    """An older worker (it reads v1 and v2) and a v3 job (descriptors at points): it
    answers 503, so the client retries and a newer worker takes it; never a silent drop."""
    from cleandift.images import resize_rgb
    from cleandift.service.messages import Job, JobSpec

    keys, r = Keys(settings.queue_prefix), redis_client(settings)
    old = JobConsumer(r, keys, "old-worker", visibility_timeout_s=30, max_deliveries=3,
                      result_ttl_s=60, stream_maxlen=1000, readable_versions=(1, 2))
    spec = JobSpec(kind="features", input_size=256, layers=["us6"], image_sizes=[photo.size],
                   points=[(1.0, 2.0)], reply_to="test-replies")
    assert spec.minimum_version() == 3
    r.xadd(keys.jobs, Job(spec, [resize_rgb(photo, 256)]).to_fields(spec.minimum_version()))
    assert old.claim(10, 100) == []  # refused, not run
    result = _wait_result(r, keys, spec.id)
    assert result.meta.status == 503 and "v3" in result.meta.error
    assert r.xlen(keys.jobs) == 0  # acknowledged and removed: nobody waits in vain

