"""One request must not hurt the others: a job the stages cannot serve fails alone in
its batch; the per-job cost ceiling, measured with the costliest requests it allows, each
beside another client, on the demo model with one worker (the costliest the old limits
allowed, mode=dift, 16 targets, size 1024: 136 UNet passes, is refused at once)."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis

from cleandift.bench.stack import service_stack
from cleandift.cost import request_cost
from cleandift.service.messages import Job, JobSpec, Result
from cleandift.service.queue.keys import Keys
from cleandift.settings import Settings
from tests.corpus import encode, textured_image
from tests.reliability.helpers import IMAGE
from tests.service.service_helpers import metric, wait_metric

pytestmark = pytest.mark.integration
SOURCE = encode(textured_image(640, 480, 21), "JPEG")
TARGET = encode(textured_image(640, 480, 22), "JPEG")
POINTS = json.dumps([[6.39 * (i % 100), 4.79 * (i // 10)] for i in range(1000)])


def _poison(redis_url: str, prefix: str) -> str:
    """A job the API would refuse (points=[]), put straight into the stream: what a
    worker must survive from another API version or a bug."""
    spec = JobSpec(kind="features", input_size=256, layers=["us6"], image_sizes=[(256, 256)],
                   points=[], deadline=time.time() + 60)
    job = Job(spec=spec, images=[np.zeros((256, 256, 3), np.uint8)])
    redis.Redis.from_url(redis_url).xadd(Keys(prefix).jobs, job.to_fields())  # type: ignore[arg-type]
    return spec.id


def _result(redis_url: str, prefix: str, job_id: str, timeout: float = 120) -> Result:
    client, deadline = redis.Redis.from_url(redis_url), time.monotonic() + timeout
    while not (fields := client.hgetall(Keys(prefix).result(job_id))):
        assert time.monotonic() < deadline, "the poisoned job was never answered"
        time.sleep(0.05)
    return Result.from_fields(fields)


def test_a_job_the_stages_cannot_serve_fails_alone_in_its_batch(demo_dir, record):
    """10 clients and one poisoned job share a batch (queued behind a slow request): the
    poisoned job gets 422, the 10 get 200. Sent to the API, points=[] is 422 at once."""
    with service_stack(str(demo_dir), queue_prefix="poison", max_batch="16",
                       torch_threads="1") as stack:
        refused = httpx.post(stack.url + "/features", files={"image": IMAGE},
                             data={"points": "[]"}, timeout=30)
        with ThreadPoolExecutor(max_workers=11) as pool:
            slow = pool.submit(httpx.post, stack.url + "/features", files={"image": IMAGE},
                               data={"size": "640", "mode": "dift"}, timeout=120)
            time.sleep(1.0)  # the worker is busy with it: the next ones batch together
            clients = [pool.submit(httpx.post, stack.url + "/features", timeout=120,
                                   files={"image": IMAGE}) for _ in range(10)]
            poisoned = _result(stack.redis_url, "poison", _poison(stack.redis_url, "poison"))
            statuses = [f.result().status_code for f in clients]
            assert slow.result().status_code == 200
    assert refused.status_code == 422 and "points" in refused.json()["detail"]
    assert poisoned.meta.status == 422 and "points" in poisoned.meta.error
    assert statuses == [200] * 10
    record(fault="one job the stages cannot serve (points=[]) queued with 10 others behind a "
           "slow one", sent=12, succeeded=10, refused=2, errors=0, lost=0,
           notes="the poisoned job (put in the stream directly): 422 from the worker, the 10 "
                 "batch-mates 200; points=[] sent to the API: 422 before any worker")


def largest_size(ceiling: float, **shape) -> int:
    """The largest input side at which a request of this shape is still allowed."""
    allowed = [s for s in range(64, Settings().max_size + 1, 64)
               if request_cost(size=s, stride=16, **shape).total <= ceiling]
    assert allowed, shape
    return allowed[-1]


def costliest(ceiling: float) -> list[tuple[str, str, dict, list]]:
    """(name, route, form, files): the forward-heaviest and the matching-heaviest shape."""
    dift = largest_size(ceiling, kind="features", mode="dift", layers=["us10"], images=1,
                        points=0)
    many = largest_size(ceiling, kind="correspond", mode="clean", layers=["us6"], images=5,
                        points=1000)
    return [
        (f"mode=dift, layers=us10, size {dift} (8 UNet passes)", "/features",
         {"mode": "dift", "layers": "us10", "size": str(dift)}, [("image", ("i.jpg", SOURCE))]),
        (f"/correspond, 4 targets x 1000 points, size {many}", "/correspond",
         {"points": POINTS, "size": str(many)},
         [("source", ("s.jpg", SOURCE))] + [("target", (f"t{i}.jpg", TARGET))
                                            for i in range(4)]),
    ]


def _beside(url: str, stop: threading.Event) -> list[tuple[int, float]]:
    """Another client: plain /features, one after another, until told to stop."""
    seen = []
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            t0 = time.monotonic()
            status = client.post(url + "/features", files={"image": IMAGE}).status_code
            seen.append((status, time.monotonic() - t0))
    return seen


def test_the_costliest_allowed_requests_and_a_client_beside_them(demo_dir, record):
    ceiling = Settings().max_job_cost
    notes, statuses = [], []
    with service_stack(str(demo_dir), queue_prefix="costly", torch_threads="1") as stack:
        files = [("source", ("s.jpg", SOURCE))] + [("target", (f"t{i}.jpg", TARGET))
                                                   for i in range(16)]
        t0 = time.monotonic()
        refused = httpx.post(stack.url + "/correspond", files=files, timeout=120,
                             data={"mode": "dift", "size": "1024", "points": POINTS})
        refused_s = time.monotonic() - t0
        base = httpx.post(stack.url + "/features", files={"image": IMAGE}, timeout=60)
        for name, route, form, sent in costliest(ceiling):
            stop = threading.Event()
            with ThreadPoolExecutor(max_workers=1) as pool:
                other = pool.submit(_beside, stack.url, stop)
                t0 = time.monotonic()
                answer = httpx.post(stack.url + route, data=form, files=sent, timeout=300)
                took = time.monotonic() - t0
                stop.set()
                beside = other.result()
            statuses += [answer.status_code] + [s for s, _ in beside]
            assert answer.status_code == 200, answer.text[:300]
            timings = answer.json()["timings_ms"]
            waits = [t for _, t in beside]
            notes.append(f"{name}: {took:.1f} s (forward {timings['inference'] / 1000:.1f} s); "
                         f"a client beside it: {len(waits)} requests, median "
                         f"{statistics.median(waits):.1f} s, max {max(waits):.1f} s")
    load = os.getloadavg()[0]
    print("\n".join(notes), f"load {load:.1f}", sep="\n")
    assert refused.status_code == 422 and "ceiling" in refused.json()["detail"]
    assert base.status_code == 200 and set(statuses) == {200}, statuses
    reference = base.json()["timings_ms"]["inference"]
    record(fault=f"costliest requests under the per-job ceiling ({ceiling:g} megapixel-passes)"
           " beside another client, 1 worker (1 torch thread)", sent=len(statuses) + 1,
           succeeded=len(statuses), refused=1, errors=0, lost=0,
           notes=f"mode=dift, 16 targets, size 1024 (273 megapixel-passes): 422 in "
                 f"{refused_s:.1f} s; " + "; ".join(notes) + f"; a plain /features forward "
                 f"{reference:.0f} ms at 1-min load average {load:.1f} on 2 cores")


def test_a_client_that_goes_away_cancels_its_job(demo_dir, record):
    """The costliest DIFT request, its client gone after 2 s (the worker took it at once:
    it was idle): the API cancels the job, the worker stops its forward between two UNet
    passes (499, counted; the stopped forward processed no image), and serves the next."""
    ceiling = Settings().max_job_cost
    _, _, form, sent = costliest(ceiling)[0]
    with service_stack(str(demo_dir), queue_prefix="gone", torch_threads="1") as stack:
        with httpx.Client(base_url=stack.url) as client:
            t0 = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                client.post("/features", data=form, files=sent, timeout=2)
            text = wait_metric(client, "cleandift_jobs_cancelled_total", 1, timeout=60)
            cancelled_s = time.monotonic() - t0
            after = client.post("/features", files={"image": IMAGE}, timeout=60)
            text = wait_metric(client, "cleandift_images_processed_total", 1, timeout=30)
            api = client.get("/metrics").text
    assert metric(text, "cleandift_jobs_cancelled_total") == 1
    assert metric(text, "cleandift_jobs_total", status="499") == 1
    assert after.status_code == 200
    assert metric(text, "cleandift_images_processed_total") == 1  # the cancelled one: none
    assert metric(api, "cleandift_requests_total", status="499") == 1
    record(fault="a client that goes away 2 s into the costliest DIFT request", sent=2,
           succeeded=1, refused=0, errors=0, lost=0,
           notes=f"its job stopped between UNet passes and counted cancelled "
                 f"{cancelled_s:.1f} s after it was sent; the next client 200")
