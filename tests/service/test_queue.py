"""Queue semantics with real Redis and real workers: batching, sharing, redelivery,
dead letters, bounds, deadlines and readiness."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from cleandift.service.messages import Heartbeat
from cleandift.service.queue.consumer import JobConsumer
from cleandift.service.queue.keys import Keys
from cleandift.service.worker import stages
from tests.corpus import encode
from tests.service.service_helpers import (
    ApiServer,
    WorkerThread,
    metric,
    redis_client,
    running_service,
    wait_metric,
    wait_ready,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def jpeg(photo) -> bytes:
    return encode(photo, "JPEG", quality=90)


def post(client: httpx.Client, data: bytes, **fields) -> httpx.Response:
    return client.post("/features", files={"image": ("x.jpg", data)}, data=fields)


def parallel(n: int, call):
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda _i: call(), range(n)))


def publish_model_then_stop(settings, extractor) -> None:
    """Leave the model description in Redis with no live worker (a worker that exited)."""
    with WorkerThread(settings, extractor):
        client = redis_client(settings)
        deadline = time.monotonic() + 10
        while not client.exists(Keys(settings.queue_prefix).model):
            assert time.monotonic() < deadline
            time.sleep(0.05)


def busy_worker(settings, name: str = "busy") -> JobConsumer:
    """A consumer that heartbeats once (alive for worker_ttl_s) and claims only when told:
    a worker busy elsewhere, or one about to die silently."""
    consumer = JobConsumer(redis_client(settings), Keys(settings.queue_prefix), name,
                           visibility_timeout_s=settings.visibility_timeout_s,
                           max_deliveries=settings.max_deliveries, result_ttl_s=60,
                           stream_maxlen=1000)
    consumer.heartbeat(Heartbeat(id=name, pid=0, host="test", model="m", version="v",
                                 device="cpu", started_at=time.time()), settings.worker_ttl_s)
    return consumer


def test_concurrent_requests_are_batched(settings, extractor, jpeg):
    with running_service(settings, extractor) as (client, _):
        responses = parallel(16, lambda: post(client, jpeg))
        assert all(r.status_code == 200 for r in responses)
        text = wait_metric(client, "cleandift_batch_size_images_sum", 16)
        api = client.get("/metrics").text
    batches = metric(text, "cleandift_batch_size_images_count")
    images = metric(text, "cleandift_batch_size_images_sum")
    assert images == 16 and batches < 16, "some forward passes held several images"
    assert metric(api, "cleandift_requests_total", route="/features", status="200") == 16
    assert metric(text, "cleandift_images_processed_total") == 16
    assert metric(text, "cleandift_queue_wait_seconds_count") == 16


def test_two_workers_share_the_load(settings, extractor, jpeg):
    slow = settings.model_copy(update={"max_batch": 1})
    with running_service(slow, extractor, workers=2) as (client, threads):
        responses = parallel(12, lambda: post(client, jpeg, size="512"))
        assert all(r.status_code == 200 for r in responses)
        done = [t.worker.metrics.value("cleandift_images_processed_total") for t in threads]
    assert sum(done) == 12 and min(done) >= 1, done


def worker_process(settings, demo_dir, worker_id: str) -> subprocess.Popen:
    """A real `cleandift worker` process on this test's queue (batches of 2)."""
    env = {**os.environ, "CLEANDIFT_REDIS_URL": settings.redis_url,
           "CLEANDIFT_QUEUE_PREFIX": settings.queue_prefix, "CLEANDIFT_MODEL": str(demo_dir),
           "CLEANDIFT_DEVICE": "cpu", "CLEANDIFT_WORKER_ID": worker_id,
           "CLEANDIFT_MAX_BATCH": "2", "CLEANDIFT_WORKER_PORT": "0",
           "CLEANDIFT_FEATURE_CACHE_BYTES": "0", "CLEANDIFT_FEATURE_CACHE_SHARED_BYTES": "0"}
    return subprocess.Popen([sys.executable, "-m", "cleandift.cli", "worker"], env=env)


def wait_until_holding(r, keys: Keys, worker_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not r.xpending_range(keys.jobs, keys.group, "-", "+", 10, worker_id):
        assert time.monotonic() < deadline, f"{worker_id} never held a job"
        time.sleep(0.01)


@contextmanager
def worker_holding_jobs(settings, demo_dir, worker_id: str, jpeg: bytes, requests: int):
    """A worker process, an API, `requests` requests in flight, and the moment the worker
    holds some of them: yields (process, redis client, keys, futures of the responses)."""
    process = worker_process(settings, demo_dir, worker_id)
    keys = Keys(settings.queue_prefix)
    try:
        with ApiServer(settings) as api, httpx.Client(base_url=api.url, timeout=60) as client:
            wait_ready(client, timeout=60)
            r = redis_client(settings)
            with ThreadPoolExecutor(max_workers=requests) as pool:
                futures = [pool.submit(post, client, jpeg, size="512") for _ in range(requests)]
                wait_until_holding(r, keys, worker_id)
                yield process, r, keys, futures
    finally:
        if process.poll() is None:
            process.kill()


def test_jobs_of_a_killed_worker_are_rerun_by_another(settings, extractor, jpeg, demo_dir):
    quick = settings.model_copy(update={"visibility_timeout_s": 1.0, "max_batch": 2})
    with worker_holding_jobs(quick, demo_dir, "victim", jpeg, 12) as (victim, r, keys, futures):
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        held = len(r.xpending_range(keys.jobs, keys.group, "-", "+", 100, "victim"))
        with WorkerThread(quick, extractor, name="rescuer") as rescuer:
            statuses = [f.result().status_code for f in futures]
            retried = rescuer.worker.metrics.value("cleandift_deliveries_retried_total")
    assert held >= 1
    assert statuses == [200] * 12
    assert retried >= held


def test_jobs_past_max_deliveries_are_dead_lettered(settings, extractor, jpeg):
    strict = settings.model_copy(update={"visibility_timeout_s": 0.3, "max_deliveries": 1})
    publish_model_then_stop(strict, extractor)
    keys = Keys(strict.queue_prefix)
    ghost = busy_worker(strict, "ghost")
    with ApiServer(strict) as api, httpx.Client(base_url=api.url, timeout=60) as client:
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(post, client, jpeg)
            claimed = []
            deadline = time.monotonic() + 10
            while not claimed:  # a consumer that takes the job and dies silently
                assert time.monotonic() < deadline
                claimed = ghost.claim(1, 100)
            time.sleep(0.4)
            with WorkerThread(strict, extractor) as rescuer:
                response = future.result()
                # The client is answered before the intake thread counts the dead letter.
                deadline = time.monotonic() + 5
                while (dead := rescuer.worker.metrics.value("cleandift_dead_lettered_total")) < 1:
                    assert time.monotonic() < deadline, "dead letter never counted"
                    time.sleep(0.02)
    assert response.status_code == 500 and "deliveries" in response.json()["detail"]
    assert dead == 1
    assert redis_client(strict).xlen(keys.dead) == 1


def test_full_queue_answers_429_without_enqueuing(settings, extractor, jpeg):
    small = settings.model_copy(update={"max_queue": 2})
    publish_model_then_stop(small, extractor)
    busy_worker(small)
    keys = Keys(small.queue_prefix)
    access, lines = logging.getLogger("cleandift.access"), io.StringIO()
    handler = logging.StreamHandler(lines)
    access.addHandler(handler)
    level, access.level = access.level, logging.INFO
    try:
        with ApiServer(small) as api, httpx.Client(base_url=api.url, timeout=60) as client:
            with ThreadPoolExecutor(max_workers=2) as pool:
                waiting = [pool.submit(post, client, jpeg) for _ in range(2)]
                r = redis_client(small)
                while r.xlen(keys.jobs) < 2:
                    time.sleep(0.01)
                refused = post(client, jpeg)
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                assert r.xlen(keys.jobs) == 2
                with WorkerThread(small, extractor):
                    assert [f.result().status_code for f in waiting] == [200, 200]
    finally:
        access.removeHandler(handler)
        access.level = level
    # The refusal has its access line, like every answer.
    assert "POST /features 429" in lines.getvalue()


def test_deadline_gives_504_and_the_job_never_reaches_the_model(settings, extractor, jpeg):
    hurried = settings.model_copy(update={"request_timeout_s": 1.0, "result_ttl_s": 1})
    publish_model_then_stop(hurried, extractor)
    busy_worker(hurried)
    with ApiServer(hurried) as api, httpx.Client(base_url=api.url, timeout=60) as client:
        response = post(client, jpeg)
        assert response.status_code == 504
        assert response.headers["content-type"] == "application/problem+json"
        # The API took the job out of the stream when it gave up: nobody will run it.
        assert redis_client(hurried).xlen(Keys(hurried.queue_prefix).jobs) == 0
        with WorkerThread(hurried, extractor) as late:
            time.sleep(1.0)
            assert late.worker.metrics.value("cleandift_images_processed_total") == 0


def test_no_live_worker_answers_503_at_once_and_queues_nothing(settings, extractor, jpeg):
    publish_model_then_stop(settings, extractor)  # the model is known, its worker is gone
    with ApiServer(settings) as api, httpx.Client(base_url=api.url, timeout=60) as client:
        start = time.monotonic()
        refused = post(client, jpeg)
        waited = time.monotonic() - start
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "no worker" in refused.json()["detail"]
        assert redis_client(settings).xlen(Keys(settings.queue_prefix).jobs) == 0
    assert waited < settings.request_timeout_s / 2  # not a deadline: at once


def test_waiting_requests_outlive_a_worker_restart(settings, extractor, jpeg):
    """A request accepted while a worker lived: that worker vanishes and none is heard
    from for longer than a restart's first seconds (serve takes ~15 s). The job is in
    Redis and the deadline allows the wait: the worker that comes back answers it (200);
    only NEW requests get 503 at once meanwhile."""
    quick = settings.model_copy(update={"worker_ttl_s": 1.0, "heartbeat_s": 0.2})
    publish_model_then_stop(quick, extractor)
    busy_worker(quick, "vanishing")  # alive for 1 s, never claims, never beats again
    keys = Keys(quick.queue_prefix)
    with ApiServer(quick) as api, httpx.Client(base_url=api.url, timeout=60) as client, \
            ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(post, client, jpeg)
        deadline = time.monotonic() + 10
        while redis_client(quick).xlen(keys.jobs) < 1:
            assert time.monotonic() < deadline, "the request was not accepted"
            time.sleep(0.02)
        time.sleep(7.0)  # no worker alive for ~6 s
        assert not waiting.done(), waiting.result().text
        refused = post(client, jpeg)
        with WorkerThread(quick, extractor):
            answered = waiting.result(timeout=30)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert answered.status_code == 200, answered.text


def test_a_result_lost_before_its_fetch_is_computed_again(settings, extractor, jpeg,
                                                          monkeypatch):
    """The worker finished and holds the result, then dies before the API fetches it; its
    successor starts seconds later. The API submits the job again and waits for it while
    the deadline allows (200, later; docs/transport.md), not 503."""
    from cleandift.service.api import fetch

    real_fetch, lost = fetch.ResultFetcher.fetch, threading.Event()
    first = WorkerThread(settings, extractor)

    async def dies_first(self, meta):
        if not lost.is_set():
            lost.set()
            await asyncio.to_thread(first.__exit__)  # gone, and forgotten in Redis
            raise fetch.FetchFailed("connection refused")
        return await real_fetch(self, meta)

    monkeypatch.setattr(fetch.ResultFetcher, "fetch", dies_first)
    with ApiServer(settings) as api, httpx.Client(base_url=api.url, timeout=60) as client, \
            ThreadPoolExecutor(max_workers=1) as pool:
        first.__enter__()
        wait_ready(client)
        waiting = pool.submit(post, client, jpeg)
        assert lost.wait(30), "the result was never fetched"
        time.sleep(7.0)  # no worker for a while
        with WorkerThread(settings, extractor) as successor:
            answered = waiting.result(timeout=30)
    assert answered.status_code == 200, answered.text
    assert successor.worker.metrics.value("cleandift_images_processed_total") == 1


def test_readiness_follows_workers_and_redis(settings, extractor):
    with ApiServer(settings) as api, httpx.Client(base_url=api.url, timeout=10) as client:
        body = client.get("/readyz")
        assert body.status_code == 503 and "worker" in body.json()["detail"]
        assert client.get("/healthz").status_code == 200
        with WorkerThread(settings, extractor):
            wait_ready(client)
        assert client.get("/readyz").status_code == 503  # a clean exit leaves at once
    dead = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with ApiServer(dead) as api, httpx.Client(base_url=api.url, timeout=10) as client:
        body = client.get("/readyz")
        assert body.status_code == 503 and "Redis" in body.json()["detail"]
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200
        models = client.get("/v1/models")  # never the Redis address in an answer
        assert models.status_code == 503 and "127.0.0.1" not in models.text


def test_api_metrics_count_the_api_and_workers_stay_on_their_own(settings, extractor, jpeg):
    """/metrics: this API's figures and the queue's; worker figures are not re-exported
    there (each API replica would count them again), only in /metrics/workers."""
    with running_service(settings, extractor) as (client, threads):
        assert post(client, jpeg).status_code == 200
        workers = wait_metric(client, "cleandift_images_processed_total", 1)
        api = client.get("/metrics").text
    worker_id = threads[0].worker.jobs.consumer
    assert metric(workers, "cleandift_images_processed_total", worker=worker_id) == 1
    assert "cleandift_images_processed_total" not in api
    assert metric(api, "cleandift_workers_alive") == 1
    assert metric(api, "cleandift_model_info", name="cleandift-demo", version="demo-seed0") == 1
    assert metric(api, "cleandift_request_duration_seconds_count", route="/features") == 1
    assert metric(api, "cleandift_layer_requests_total", kind="features", layer="us6") == 1


def test_sigterm_finishes_and_acknowledges_what_the_worker_holds(settings, extractor, jpeg,
                                                                 demo_dir):
    with worker_holding_jobs(settings, demo_dir, "leaver", jpeg, 8) as (leaver, r, keys, futures):
        leaver.send_signal(signal.SIGTERM)
        assert leaver.wait(timeout=60) == 0
        assert r.xpending_range(keys.jobs, keys.group, "-", "+", 10, "leaver") == []
        with WorkerThread(settings, extractor) as rescuer:
            assert [f.result().status_code for f in futures] == [200] * 8
            # nothing left over
            assert rescuer.worker.metrics.value("cleandift_deliveries_retried_total") == 0


def test_worker_http_port_serves_probes_and_metrics(settings, extractor, jpeg):
    with running_service(settings, extractor) as (client, threads):
        worker = threads[0].worker
        base = worker.url  # its own port (0 in the settings: any free one)
        assert base.startswith("http://127.0.0.1:")
        assert post(client, jpeg).status_code == 200
        assert httpx.get(base + "/healthz").status_code == 200
        ready = httpx.get(base + "/readyz")
        assert ready.status_code == 200 and "demo-seed0" in ready.json()["detail"]
        assert metric(httpx.get(base + "/metrics").text,
                      "cleandift_images_processed_total") == 1
        worker.stop()
        stopped = httpx.get(base + "/readyz")
        assert stopped.status_code == 503 and stopped.json()["detail"] == "stopping"
        assert stopped.headers["content-type"] == "application/problem+json"


def test_long_batches_are_never_taken_from_a_live_worker(settings, extractor, jpeg):
    """Batches far longer than the visibility timeout: the worker keeps its jobs fresh, so
    none is reclaimed, run twice or dead-lettered."""
    # 8 images at 1024 px take ~40 s on 2 CPU cores: a deadline that leaves room for them,
    # since what is tested is the visibility timeout, not the deadline.
    slow = settings.model_copy(update={"visibility_timeout_s": 0.6, "max_deliveries": 1,
                                       "max_batch": 4, "max_size": 1024,
                                       "request_timeout_s": 120})
    with running_service(slow, extractor, workers=2) as (client, threads):
        responses = parallel(8, lambda: post(client, jpeg, size="1024"))
        retried = sum(t.worker.metrics.value("cleandift_deliveries_retried_total") for t in threads)
        dead = sum(t.worker.metrics.value("cleandift_dead_lettered_total") for t in threads)
        images = sum(t.worker.metrics.value("cleandift_images_processed_total") for t in threads)
    assert [r.status_code for r in responses] == [200] * 8
    assert (retried, dead, images) == (0, 0, 8)


def test_jobs_of_a_hung_worker_are_taken_over(settings, extractor, jpeg, monkeypatch):
    """A forward that never returns: the worker stops holding its jobs and another worker
    answers them; the client never sees the hang."""
    quick = settings.model_copy(update={"visibility_timeout_s": 1.0, "forward_timeout_s": 0.5,
                                        "heartbeat_s": 0.1})
    release, hung = threading.Event(), {}
    real_forward = stages.forward

    def forward(prepared, model, *args):
        if threading.current_thread() is hung.get("thread"):
            release.wait(60)
            raise RuntimeError("the GPU never answered")
        return real_forward(prepared, model, *args)

    monkeypatch.setattr(stages, "forward", forward)
    keys = Keys(quick.queue_prefix)
    with ApiServer(quick) as api, httpx.Client(base_url=api.url, timeout=60) as client:
        victim = WorkerThread(quick, extractor, name="victim")
        hung["thread"] = victim.thread
        with victim, ThreadPoolExecutor(max_workers=2) as pool:
            wait_ready(client)
            futures = [pool.submit(post, client, jpeg) for _ in range(2)]
            wait_until_holding(redis_client(quick), keys, "victim")
            with WorkerThread(quick, extractor, name="rescuer") as rescuer:
                statuses = [f.result().status_code for f in futures]
                retried = rescuer.worker.metrics.value("cleandift_deliveries_retried_total")
            assert victim.worker.lease.stuck() and not victim.worker.lease.ready()[0]
            release.set()
    assert statuses == [200, 200] and retried >= 1
