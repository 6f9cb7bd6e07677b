"""The GPU worker: intake, forward and post stages on their own threads, and a lease.

The intake thread claims jobs and prepares batches (intake.py); the core thread only ever
waits for a prepared batch and runs the forward pass; post threads compute matches and
encode results, and hand the answers to Redis or to the worker's port. Meanwhile the
lease (lease.py) keeps the held jobs fresh, heartbeats, detects a hung forward and
answers the probes. SIGTERM stops claiming, finishes and answers what was claimed, then
exits.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from cleandift.settings import Settings

from ..featurecache import FeatureCache
from ..messages import Job, Result
from ..metrics import WorkerMetrics
from . import answering, isolation, post, stages
from .claiming import Claimer, Consumer
from .holder import ModelHolder
from .intake import Intake
from .lease import Lease, safe
from .reload import RegistryWatcher
from .results import ResultStore
from .switch import FleetSwitch
from .waiting import Waiting

log = logging.getLogger(__name__)
# How often an idle stage looks whether the one before it has finished: a stop waits for
# each stage in turn, so this bounds how long stopping takes (20 wake-ups/s cost nothing).
POLL_S = 0.05
Answer = tuple[Job, Result]


class Worker:
    def __init__(
        self, settings: Settings, model: ModelHolder, jobs: Consumer, metrics: WorkerMetrics,
        watcher: RegistryWatcher | None = None, cache: FeatureCache | None = None,
    ) -> None:
        self.settings, self.model, self.jobs, self.metrics = settings, model, jobs, metrics
        self.watcher, self.cache = watcher, cache
        self.switch: FleetSwitch | None = watcher.switch if watcher is not None else None
        self.claimer = Claimer(jobs, settings, metrics, model, self.switch, safe)
        self.results = ResultStore(settings.result_store_bytes, settings.result_hold_s)
        self.stopping = threading.Event()
        self.lease = Lease(settings, jobs, metrics, model, self.claimer, self.stopping)
        self.waiting = Waiting(jobs.cancelled, settings.cancel_poll_s)
        self._pre: queue.Queue[stages.Prepared] = queue.Queue(maxsize=2)
        self._post: queue.Queue[stages.Computed] = queue.Queue(maxsize=2)
        self.intake = Intake(settings, model, self.claimer, self.lease, self.waiting, cache,
                             metrics, self._answer, self._release,
                             lambda item: self._put(self._pre, item),
                             lambda item: self._put(self._post, item))
        self._intake_done = threading.Event()
        self._core_done = threading.Event()
        self.match_limits = post.MatchLimits(settings.match_max_pixels,
                                               settings.match_answer_margin_s)

    @property
    def url(self) -> str:
        """Where the API fetches this worker's held results ("" without a port)."""
        return self.lease.url

    def run(self) -> None:
        """Serve until `stop()`; returns after every claimed job has been answered."""
        self.lease.open_port(self.results)
        self.lease.publish_model()
        workers = [threading.Thread(target=self._guard(lambda: self.intake.run(self.stopping),
                                                       self._intake_done), name="intake")]
        workers += [threading.Thread(target=self._guard(self._post_loop, None), name=f"post-{i}")
                    for i in range(self.settings.post_threads)]
        beating = threading.Thread(target=self.lease.run, args=(self._core_done,),
                                   name="heartbeat", daemon=True)
        for thread in [*workers, beating]:
            thread.start()
        self.waiting.start()
        if self.watcher is not None:
            self.watcher.start()
        try:
            self._core()
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            self._core_done.set()
            for thread in [*workers, beating]:  # nothing of this worker outlives run()
                thread.join()
            self.waiting.stop()
            self.intake.close()
            safe(self.jobs.leave, None)
            if self.switch is not None:
                self.switch.leave()
            self.lease.close_port()
        log.info("worker %s stopped", self.jobs.consumer)

    def stop(self, *_args: object) -> None:
        log.info("worker %s stopping: finishing claimed jobs", self.jobs.consumer)
        self.stopping.set()

    # -- core and post ----------------------------------------------------------------
    def _core(self) -> None:
        while True:
            self._swap()  # idle too: /v1/models then names the new version at once
            try:
                prepared = self._pre.get(timeout=POLL_S)
            except queue.Empty:
                if self._intake_done.is_set():
                    return
                continue
            self._swap()  # the batch may have been claimed after a flip
            self._forward(prepared)  # a method, so no stale reference to a model outlives it

    def _swap(self) -> None:
        """Between batches only (one version per batch); with a switch only to the fleet's
        live version, never before the fleet has it."""
        replaced, live = self.model.current.info, self.claimer.live
        if (self.switch is None or live is not None) and self.model.maybe_swap(live):
            if self.cache is not None:
                log.info("dropped %d cached maps of %s %s", self.cache.invalidate(replaced),
                         replaced.name, replaced.version)
            self.lease.publish_model()

    def _forward(self, prepared: stages.Prepared) -> None:
        extractor = self.model.current
        wanted = prepared.version  # the fleet's version at the claim, or a newer live one
        if wanted is not None and extractor.info.version not in (wanted, self.claimer.live):
            self._release(prepared.batch.jobs)  # claimed for a version no longer held here
            return
        with self.lease.forward():  # a fault is bisected to the job that causes it
            done, failed = isolation.forward(prepared, extractor, extractor.device.type == "cuda",
                                             self.waiting)
        self._answer(failed)
        for computed in done:
            images = len(computed.prepared.batch.images)
            self.metrics.batch_size.observe(images)
            self.metrics.inference.observe(computed.inference_s)
            self.metrics.images.inc(images)
            self._put(self._post, computed)

    def _post_loop(self) -> None:
        while True:
            try:
                computed = self._post.get(timeout=POLL_S)
            except queue.Empty:
                if self._core_done.is_set():
                    return
                continue
            self._answer(self._results(computed))
            del computed

    def _results(self, computed: stages.Computed) -> list[Answer]:
        post_started = time.time()
        answers = isolation.results(computed, self.match_limits, self.waiting)  # each alone
        try:
            self._remember(computed)
            post.trace(computed, post_started)
        except Exception:  # extras: the answers stand
            log.exception("caching or tracing a batch failed")
        return isolation.placed(answers, self._place)

    def _place(self, result: Result) -> None:
        """A large body stays here for the API to fetch directly; the rest goes inline."""
        body, meta = result.body, result.meta
        direct = self.settings.result_transport == "direct" and self.lease.url
        if body is None or not direct or body.nbytes <= self.settings.inline_result_bytes:
            return
        token = self.results.put(meta.job_id, body)
        if token is None:  # the store is full: through Redis, as before
            self.metrics.results_inline_full.inc()
            return
        meta.location, meta.token, meta.nbytes = f"{self.lease.url}/results/{meta.job_id}", token, \
            body.nbytes
        result.body = None

    def _remember(self, computed: stages.Computed) -> None:
        """Keep what a forward computed for each image, for the next time it comes."""
        if self.cache is None or computed.cached:
            return
        batch = computed.prepared.batch
        for job, rows in zip(batch.jobs, batch.rows()):
            self.cache.remember(job, computed.extractor, stages.image_maps(computed, rows))
        if self.cache.memory is not None:
            self.metrics.cache_bytes.set(self.cache.memory.used)

    # -- helpers ----------------------------------------------------------------------
    def _release(self, jobs: list[Job]) -> None:
        """Stop holding jobs this worker cannot run: another takes them over once their
        visibility timeout passes (they stay pending in Redis)."""
        if jobs:
            log.warning("released %d jobs: the fleet serves %s, which this worker does not "
                        "hold", len(jobs), self.claimer.live)
        self.waiting.forget([job.spec.id for job in jobs])
        self.lease.let_go(job.entry for job in jobs)

    def _answer(self, answers: list[Answer]) -> None:
        """Count and store; whatever happens, this worker holds the jobs no more (one
        not stored stays pending in Redis and is reclaimed by a later delivery)."""
        if not answers:
            return
        self.waiting.forget([job.spec.id for job, _ in answers])
        answering.count(self.metrics, answers)
        answering.store(self.jobs.complete, answers, self.settings.request_timeout_s)
        self.lease.let_go(job.entry for job, _ in answers)

    def _put(self, q: queue.Queue[Any], item: object) -> None:
        """Hand over to the next stage; if that stage is gone the jobs stay pending in
        Redis and are reclaimed by another worker."""
        while True:
            try:
                q.put(item, timeout=POLL_S)
                return
            except queue.Full:
                if self._core_done.is_set():
                    return

    def _guard(self, target: Callable[[], None], done: threading.Event | None
               ) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception:
                log.exception("%s thread crashed; stopping the worker", threading.current_thread())
                self.stopping.set()
            finally:
                if done is not None:
                    done.set()

        return run
