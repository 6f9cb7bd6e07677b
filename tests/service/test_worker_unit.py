"""The worker's failure paths, fast: the real Worker and the real demo model, fed by an
in-memory queue (the Redis queue itself is tested against a real Redis in test_queue.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from cleandift.service.messages import Heartbeat, Job, JobSpec, Result
from cleandift.service.metrics import WorkerMetrics
from cleandift.service.queue.errors import QueueUnavailable
from cleandift.service.worker import post, stages
from cleandift.service.worker.holder import ModelHolder
from cleandift.service.worker.loop import Worker
from cleandift.settings import Settings

SIZE = 64


class MemoryQueue:
    """The worker's queue interface over a deque; records everything the worker does."""

    consumer = "unit-worker"

    def __init__(self, fail_completes: int = 0) -> None:
        self.waiting: deque[Job] = deque()
        self.answers: dict[str, Result] = {}
        self.completes = 0
        self.fail_completes = fail_completes
        self.touched: set[str] = set()
        self.beats: list[Heartbeat] = []
        self.models: list[str] = []
        self.gone: set[str] = set()  # jobs whose client went away
        self.lock = threading.Lock()

    def claim(self, count: int, block_ms: int) -> list[Job]:
        with self.lock:
            jobs = [self.waiting.popleft() for _ in range(min(count, len(self.waiting)))]
        if not jobs:
            time.sleep(0.01)
        return jobs

    def reclaim(self, count: int) -> tuple[list[Job], int]:
        return [], 0

    def claim_own_pending(self, count: int, after: str = "0") -> tuple[list[Job], int, str]:
        return [], 0, ""

    def complete(self, answers: Sequence[tuple[Job, Result]]) -> None:
        with self.lock:
            self.completes += 1
            if self.fail_completes > 0:
                self.fail_completes -= 1
                raise QueueUnavailable("Redis is restarting")
            for job, result in answers:
                assert job.spec.id not in self.answers, "a job was answered twice"
                self.answers[job.spec.id] = result

    def touch(self, entries: Sequence[tuple[int, str]]) -> None:
        self.touched.update(entry for _, entry in entries)

    def cancelled(self, job_ids: Sequence[str]) -> set[str]:
        with self.lock:
            return self.gone & set(job_ids)

    def heartbeat(self, beat: Heartbeat, ttl_s: float) -> None:
        self.beats.append(beat)

    def leave(self) -> None:
        pass

    def publish_model(self, info_json: str) -> None:
        self.models.append(info_json)

    def wait_answers(self, n: int, timeout: float = 30) -> dict[str, Result]:
        deadline = time.monotonic() + timeout
        while len(self.answers) < n:
            assert time.monotonic() < deadline, f"{len(self.answers)} of {n} answered"
            time.sleep(0.01)
        return self.answers


def job(i: int, *, deadline: float | None = None, kind: str = "features") -> Job:
    images = 2 if kind == "correspond" else 1
    spec = JobSpec(kind=kind, input_size=SIZE, layers=["us6"], image_sizes=[(SIZE, SIZE)] * images,
                   deadline=time.time() + 60 if deadline is None else deadline,
                   points=[(3.0, 4.0)] if kind == "correspond" else None)
    pixels = np.full((SIZE, SIZE, 3), i, np.uint8)
    return Job(spec=spec, images=[pixels] * images, entry_id=f"{i}-0")


@contextmanager
def running(queue: MemoryQueue, extractor, **overrides) -> Iterator[Worker]:
    options = {"redis_url": "redis://memory", "heartbeat_s": 0.05, "worker_ttl_s": 1.0,
               "max_batch": 4, "worker_port": 0, **overrides}
    settings = Settings(**options)
    worker = Worker(settings, ModelHolder(extractor), queue, WorkerMetrics())
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the worker did not stop"


def test_jobs_are_answered_with_features_and_timings(extractor):
    queue = MemoryQueue()
    queue.waiting.extend(job(i) for i in range(5))
    with running(queue, extractor) as worker:
        answers = queue.wait_answers(5)
    assert {r.meta.status for r in answers.values()} == {200}
    first = next(iter(answers.values()))
    assert first.array("us6").shape == (64, SIZE // 16, SIZE // 16)
    assert set(first.meta.timings_ms) == {"queue", "inference"}
    assert worker.metrics.value("cleandift_images_processed_total") == 5
    assert queue.models and queue.beats, "model published and heartbeats sent"
    assert worker.lease.held == set()


def test_a_failing_forward_answers_every_job_of_the_batch(extractor, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(stages, "forward", broken)
    queue = MemoryQueue()
    queue.waiting.extend(job(i) for i in range(3))
    with running(queue, extractor) as worker:
        answers = queue.wait_answers(3)
    assert {r.meta.status for r in answers.values()} == {500}
    for result in answers.values():  # the stage and an error id; never the raw text
        assert "forward pass failed" in result.meta.error and "error id" in result.meta.error
        assert "illegal memory" not in result.meta.error
    assert worker.metrics.value("cleandift_jobs_total", kind="features", status="500") == 3


def test_a_failing_post_stage_answers_the_batch_and_the_worker_goes_on(extractor, monkeypatch):
    real = post.results
    calls = []

    def flaky(computed, *args):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("encoding bug")
        return real(computed, *args)

    monkeypatch.setattr(post, "results", flaky)
    queue = MemoryQueue()
    queue.waiting.extend([job(0), job(1, kind="correspond")])
    with running(queue, extractor, max_batch=1):
        first = queue.wait_answers(1)
        queue.waiting.append(job(2))
        answers = queue.wait_answers(3)
    assert next(iter(first.values())).meta.status == 500
    assert sorted(r.meta.status for r in answers.values()) == [200, 200, 500]


def test_expired_jobs_get_504_and_never_reach_the_model(extractor):
    queue = MemoryQueue()
    queue.waiting.extend([job(0, deadline=time.time() - 1), job(1, deadline=time.time() - 5)])
    with running(queue, extractor) as worker:
        answers = queue.wait_answers(2)
    assert {r.meta.status for r in answers.values()} == {504}
    assert worker.metrics.value("cleandift_jobs_expired_total") == 2
    assert worker.metrics.value("cleandift_images_processed_total") == 0


def test_cancelled_jobs_get_499_and_never_reach_the_model(extractor):
    queue = MemoryQueue()
    queue.waiting.extend([job(0), job(1, kind="correspond")])
    queue.gone = {j.spec.id for j in queue.waiting}
    with running(queue, extractor) as worker:
        answers = queue.wait_answers(2)
    assert {r.meta.status for r in answers.values()} == {499}
    assert worker.metrics.value("cleandift_jobs_cancelled_total") == 2
    assert worker.metrics.value("cleandift_images_processed_total") == 0


def test_a_cancelled_job_leaves_its_batch_mates_alone(extractor):
    queue = MemoryQueue()
    queue.waiting.extend([job(0), job(1), job(2, kind="correspond")])
    queue.gone = {queue.waiting[1].spec.id}
    with running(queue, extractor, max_batch=8) as worker:
        answers = queue.wait_answers(3)
    statuses = {job_id: r.meta.status for job_id, r in answers.items()}
    assert sorted(statuses.values()) == [200, 200, 499], statuses
    assert statuses[next(iter(queue.gone))] == 499
    assert worker.metrics.value("cleandift_images_processed_total") == 3  # 1 + 2 (pair)


def test_answers_are_retried_until_redis_takes_them(extractor):
    queue = MemoryQueue(fail_completes=2)
    queue.waiting.extend(job(i) for i in range(2))
    with running(queue, extractor) as worker:
        answers = queue.wait_answers(2)
    assert {r.meta.status for r in answers.values()} == {200}
    assert queue.completes >= 3  # two refusals, then the answers went through, once each
    assert worker.lease.held == set()


def test_held_jobs_are_kept_fresh_while_they_run(extractor, monkeypatch):
    real = stages.forward

    def slow(prepared, model, *args):
        time.sleep(0.3)  # several heartbeat periods
        return real(prepared, model, *args)

    monkeypatch.setattr(stages, "forward", slow)
    queue = MemoryQueue()
    queue.waiting.append(job(7))
    with running(queue, extractor):
        queue.wait_answers(1)
    assert "7-0" in queue.touched


def test_stop_answers_what_was_claimed(extractor):
    queue = MemoryQueue()
    queue.waiting.extend(job(i) for i in range(3))
    with running(queue, extractor) as worker:
        while queue.waiting:  # all claimed
            time.sleep(0.005)
        worker.stop()
    assert len(queue.answers) == 3


def test_a_hung_forward_gives_its_jobs_up_and_reports_not_alive(extractor, monkeypatch):
    release = threading.Event()

    def hang(prepared, model, *_args):
        release.wait(30)
        raise RuntimeError("the GPU never answered")

    monkeypatch.setattr(stages, "forward", hang)
    queue = MemoryQueue()
    queue.waiting.append(job(3))
    with running(queue, extractor, forward_timeout_s=0.3) as worker:
        deadline = time.monotonic() + 10
        while not worker.lease.stuck():
            assert time.monotonic() < deadline, "the hang was never noticed"
            time.sleep(0.02)
        time.sleep(0.2)  # one heartbeat period after noticing
        beats, touched = len(queue.beats), set(queue.touched)
        queue.touched.clear()
        time.sleep(0.5)  # ten heartbeat periods
        assert len(queue.beats) == beats and queue.touched == set(), "still holding on"
        assert worker.lease.ready() == (False, "a forward pass is hung")
        assert worker.lease.alive()[0] is False
        assert "3-0" in touched or beats > 0
        release.set()


def test_the_probe_port_binds_loopback_unless_told_otherwise():
    from cleandift.service.worker.server import serve_worker_http

    server = serve_worker_http(0, lambda: b"", lambda: (True, "ok"), lambda: (True, "ok"))
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()


def test_dift_answers_depend_on_the_image_alone(extractor):
    """The noise of mode=dift is seeded by the image's content hash: an image gives the
    same features alone or beside another, so the answer can be cached and reproduced."""
    from cleandift.service.worker.batching import Batch
    from cleandift.service.worker.stages import forward, prepare

    def dift(value: int, content: str) -> Job:
        spec = JobSpec(kind="features", input_size=SIZE, layers=["us6"], mode="dift",
                       image_sizes=[(SIZE, SIZE)], content=[content])
        return Job(spec=spec, images=[np.full((SIZE, SIZE, 3), value, np.uint8)])

    a, b = dift(90, "a1" * 16), dift(170, "b2" * 16)
    alone = forward(prepare(Batch([a], ["us6"]), pin=False), extractor).features["us6"]
    beside = forward(prepare(Batch([b, a], ["us6"]), pin=False), extractor).features["us6"]
    again = forward(prepare(Batch([a], ["us6"]), pin=False), extractor).features["us6"]
    assert torch.allclose(alone[0], beside[1], atol=1e-4) and torch.equal(alone, again)


# -- per-job isolation after batching (issue 26, item 1) -------------------------------

def test_a_job_failing_in_the_output_stage_fails_alone(extractor):
    """points=[] (refused by the API since, but a worker must not trust that): its batch-
    mates are answered 200, it gets a 4xx naming the problem."""
    queue = MemoryQueue()
    poison = job(9)
    poison.spec.points = []
    queue.waiting.extend([job(0), job(1), poison, job(2)])
    with running(queue, extractor):
        answers = queue.wait_answers(4)
    assert answers.pop(poison.spec.id).meta.status == 422
    assert [r.meta.status for r in answers.values()] == [200, 200, 200]


def test_a_failing_batched_forward_is_bisected_to_the_job_that_fails(extractor, monkeypatch):
    real, sizes = stages.forward, []

    def allergic(prepared, model, *args, **kwargs):  # fails whenever image 13 is in it
        sizes.append(len(prepared.batch.jobs))
        if any(int(im[0, 0, 0]) == 13 for im in prepared.batch.images):
            raise RuntimeError("CUDA error: an illegal memory access")
        return real(prepared, model, *args, **kwargs)

    monkeypatch.setattr(stages, "forward", allergic)
    queue = MemoryQueue()
    jobs = [job(0), job(13), job(1), job(2)]
    queue.waiting.extend(jobs)
    with running(queue, extractor):
        answers = queue.wait_answers(4)
    assert answers.pop(jobs[1].spec.id).meta.status == 500
    assert [r.meta.status for r in answers.values()] == [200, 200, 200]
    assert sizes[0] == 4 and 1 in sizes  # tried whole, then in smaller batches


def test_a_job_failing_in_the_pre_stage_fails_alone(extractor):
    """A job whose pixels do not fit its batch (a corrupt or foreign message): the intake
    thread survives, the job gets its answer, the others theirs."""
    queue = MemoryQueue()
    odd = job(5)
    odd.images = [np.zeros((SIZE // 2, SIZE, 3), np.uint8)]
    queue.waiting.extend([job(0), odd, job(1)])
    with running(queue, extractor) as worker:
        answers = queue.wait_answers(3)
        assert not worker.stopping.is_set()
    assert answers.pop(odd.spec.id).meta.status >= 400
    assert [r.meta.status for r in answers.values()] == [200, 200]


def test_a_job_past_its_deadline_stops_between_dift_passes(extractor):
    """The deadline passes during the ensemble: the worker stops at the next UNet pass
    instead of running the rest for nobody, and answers 504."""
    spec = JobSpec(kind="correspond", input_size=SIZE, layers=["us6"], mode="dift",
                   image_sizes=[(SIZE, SIZE)] * 4, points=[(3.0, 4.0)],
                   deadline=time.time() + 60, content=[f"{i:02x}" * 16 for i in range(4)])
    costly = Job(spec=spec, images=[np.full((SIZE, SIZE, 3), i, np.uint8) for i in range(4)],
                 entry_id="1-0")
    latents: list[int] = []

    def count(_module, args):
        latents.append(int(args[0].shape[0]))
        spec.deadline = time.time() - 1  # passes during the first UNet pass

    hook = extractor.base_unet().register_forward_pre_hook(count)
    queue = MemoryQueue()
    queue.waiting.append(costly)
    try:
        with running(queue, extractor):
            answers = queue.wait_answers(1)
    finally:
        hook.remove()
    assert answers[spec.id].meta.status == 504
    assert 0 < sum(latents) < 4 * 8, latents


def test_a_batch_that_cannot_be_prepared_is_bisected(monkeypatch):
    """The pre stage's fallback: halves until the job that breaks it is alone."""
    from cleandift.service.worker import isolation
    from cleandift.service.worker.batching import batch_of

    real = stages.prepare

    def picky(batch, pin):
        if any(int(im[0, 0, 0]) == 7 for im in batch.images):
            raise ValueError("cannot stack")
        return real(batch, pin)

    monkeypatch.setattr(stages, "prepare", picky)
    jobs = [job(i) for i in (1, 7, 2, 3, 4)]
    ready, failed = isolation.prepare(batch_of(jobs), pin=False)
    assert [(j.spec.id, r.meta.status) for j, r in failed] == [(jobs[1].spec.id, 500)]
    assert sorted(j.spec.id for p in ready for j in p.batch.jobs) == sorted(
        j.spec.id for j in jobs if j is not jobs[1])
