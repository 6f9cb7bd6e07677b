"""A worker restarted under its old name first reads the entries its previous life held.
Entries the API deleted meanwhile (their clients went away) leave empty pages; new jobs
claimed during that reading must not be read back as old ones and run twice."""

from __future__ import annotations

import time

import numpy as np

from cleandift.service.messages import Job, JobSpec
from cleandift.service.queue.consumer import JobConsumer
from cleandift.service.queue.keys import Keys
from tests.service.service_helpers import WorkerThread, redis_client

NAME = "w-restarted"


def _job(settings) -> Job:
    side = 64
    spec = JobSpec(kind="features", input_size=side, layers=["us6"], image_sizes=[(side, side)],
                   deadline=time.time() + 60)
    return Job(spec=spec, images=[np.zeros((side, side, 3), np.uint8)])


def test_deleted_old_entries_do_not_make_new_jobs_run_twice(settings, extractor):
    r, keys = redis_client(settings), Keys(settings.queue_prefix)
    small = settings.model_copy(update={"max_batch": 2})
    previous = JobConsumer(r, keys, NAME, visibility_timeout_s=60, max_deliveries=3,
                           result_ttl_s=60, stream_maxlen=1000)
    old = [r.xadd(keys.jobs, _job(small).to_fields()) for _ in range(4)]  # type: ignore[arg-type]
    assert len(previous.claim(4, 100)) == 4  # held by the previous life...
    r.xdel(keys.jobs, *old)  # ...and deleted while pending (their clients went away)
    new = [_job(small) for _ in range(3)]
    for job in new:
        r.xadd(keys.jobs, job.to_fields())  # type: ignore[arg-type]
    with WorkerThread(small, extractor, name=NAME) as worker:
        deadline = time.monotonic() + 30
        while not all(r.exists(keys.result(job.spec.id)) for job in new):
            assert time.monotonic() < deadline, "the new jobs were not all answered"
            time.sleep(0.05)
        time.sleep(1.0)  # a job read back as an old one would be answered again by now
        answered = worker.worker.metrics.value("cleandift_jobs_total", kind="features",
                                               status="200")
    assert answered == len(new)
    assert r.xpending(keys.jobs, keys.group)["pending"] == 0
