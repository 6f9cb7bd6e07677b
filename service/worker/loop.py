"""The GPU worker: claim jobs, batch them, run pre / core / post on three threads.

The core (forward) thread only ever waits for a prepared batch; decoding of the next
batch and result encoding of the last one happen meanwhile on the other two threads.
SIGTERM stops claiming, finishes and acknowledges what was claimed, then exits.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any, TypeVar

from cleandift.extractor import Extractor
from cleandift.settings import Settings

from ..messages import Heartbeat, Job, Result
from ..metrics import WorkerMetrics, device_label
from ..queue.errors import QueueUnavailable
from . import answering, isolation, stages
from .batching import collate_requests
from .cache import FeatureCache, image_keys
from .claiming import Claimer, Consumer
from .decoding import Decoder
from .holder import ModelHolder
from .reload import RegistryWatcher
from .results import ResultStore
from .server import advertised_host, serve_worker_http
from .switch import FleetSwitch
from .waiting import Waiting

log = logging.getLogger(__name__)
# How often an idle stage looks whether the one before it has finished: a stop waits for
# each stage in turn, so this bounds how long stopping takes (20 wake-ups/s cost nothing).
POLL_S = 0.05
BACKOFF_S = 1.0
T = TypeVar("T")
Answer = tuple[Job, Result]


class Worker:
    def __init__(
        self, settings: Settings, model: ModelHolder, jobs: Consumer, metrics: WorkerMetrics,
        watcher: RegistryWatcher | None = None, cache: FeatureCache | None = None,
    ) -> None:
        self.settings, self.model, self.jobs, self.metrics = settings, model, jobs, metrics
        self.watcher, self.cache = watcher, cache
        self.switch: FleetSwitch | None = watcher.switch if watcher is not None else None
        self.claimer = Claimer(jobs, settings, metrics, model, self.switch, self._safe)
        self.results = ResultStore(settings.result_store_bytes, settings.result_hold_s)
        self.decoder = Decoder(settings)
        self.url = ""  # where the API fetches held results (set when the port is open)
        self._http: ThreadingHTTPServer | None = None
        self.stopping = threading.Event()
        self._pre: queue.Queue[stages.Prepared] = queue.Queue(maxsize=1)
        self._post: queue.Queue[stages.Computed] = queue.Queue(maxsize=2)
        self._intake_done = threading.Event()
        self._core_done = threading.Event()
        self.started_at = time.time()
        self.last_heartbeat = 0.0  # monotonic time of the last heartbeat Redis accepted
        self._held: set[str] = set()  # entries claimed and not yet answered
        self._held_lock = threading.Lock()
        self._busy_since: float | None = None  # monotonic start of the running forward
        self._published: str | None = None  # the version Redis last accepted from us
        self.match_limits = stages.MatchLimits(settings.match_max_pixels,
                                               settings.match_answer_margin_s)
        self._stuck_logged = False
        self.waiting = Waiting(jobs.cancelled, settings.cancel_poll_s)

    # -- lifecycle --------------------------------------------------------------------
    def run(self) -> None:
        """Serve until `stop()`; returns after every claimed job has been answered."""
        self._open_port()
        self._publish_model()
        workers = [threading.Thread(target=self._guard(self._intake, self._intake_done),
                                    name="intake")]
        workers += [threading.Thread(target=self._guard(self._post_loop, None), name=f"post-{i}")
                    for i in range(self.settings.post_threads)]
        beating = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
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
            self.decoder.close()
            self._safe(self.jobs.leave, None)
            if self.switch is not None:
                self.switch.leave()
            self._close_port()
        log.info("worker %s stopped", self.jobs.consumer)

    def _open_port(self) -> None:
        """The worker's HTTP port: probes, metrics and held results (0: any free port)."""
        settings = self.settings
        try:
            self._http = serve_worker_http(settings.worker_port, self.metrics.render,
                                           self.ready, self.alive, host=settings.host,
                                           results=self.results,
                                           idle_timeout_s=settings.worker_idle_timeout_s)
        except OSError as exc:  # results then travel through Redis; metrics by heartbeat
            log.warning("worker port %d unavailable: %s", settings.worker_port, exc)
            return
        host = settings.worker_advertise_host or advertised_host(settings.host)
        self.url = f"http://{host}:{self._http.server_address[1]}"

    def _close_port(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def stop(self, *_args: object) -> None:
        log.info("worker %s stopping: finishing claimed jobs", self.jobs.consumer)
        self.stopping.set()

    # -- stages -----------------------------------------------------------------------
    def _intake(self) -> None:
        pin = self.model.current.device.type == "cuda"
        while not self.stopping.is_set():
            jobs, version = self.claimer.next()
            with self._held_lock:
                self._held.update(job.entry_id for job in jobs)
            extractor = self.model.get(version)
            if extractor is None:  # the fleet switched to a version this worker lacks
                self._release(jobs)
                continue
            self.waiting.watch(jobs)
            jobs, refused = isolation.batchable(self._live(jobs))
            self._answer(refused)
            jobs, undecodable = self.decoder.decode(jobs)  # the cache keys on the pixels
            self._answer(undecodable)
            for batch in collate_requests(self._from_cache(jobs, extractor),
                                          self.settings.max_batch,
                                          self.settings.max_batch_pixels):
                prepared, failed = isolation.prepare(batch, pin)  # one bad job fails alone
                self._answer(failed)
                for part in prepared:
                    part.version = version
                    self._put(self._pre, part)

    def _from_cache(self, jobs: list[Job], extractor: Extractor) -> list[Job]:
        """Jobs whose maps the cache holds go straight to the post stage; the rest return."""
        if self.cache is None:
            return jobs
        left = []
        for job in jobs:
            keys = image_keys(job.spec, extractor, job.digests)
            maps, where = self.cache.get(keys, job.spec.layers) if keys else (None, "miss")
            self.metrics.cache_lookups.labels(result=where).inc()
            if maps is None:
                left.append(job)
            else:
                self._put(self._post, stages.from_cache(job, maps, extractor))
        return left

    def _remember(self, computed: stages.Computed) -> None:
        """Keep what a forward computed for each image, for the next time it comes."""
        if self.cache is None or computed.cached:
            return
        batch = computed.prepared.batch
        for job, rows in zip(batch.jobs, batch.rows()):
            keys = image_keys(job.spec, computed.extractor, job.digests)
            if keys:
                self.cache.put(keys, stages.image_maps(computed, rows))
        if self.cache.memory is not None:
            self.metrics.cache_bytes.set(self.cache.memory.used)

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
            self._publish_model()

    def _forward(self, prepared: stages.Prepared) -> None:
        extractor = self.model.current
        wanted = prepared.version  # the fleet's version at the claim, or a newer live one
        if wanted is not None and extractor.info.version not in (wanted, self.claimer.live):
            self._release(prepared.batch.jobs)  # claimed for a version no longer held here
            return
        self._busy_since = time.monotonic()
        try:  # a fault is bisected to the job that causes it; expired jobs stop here
            done, failed = isolation.forward(prepared, extractor, extractor.device.type == "cuda",
                                             self.waiting)
        finally:
            self._busy_since = None
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
            stages.trace(computed, post_started)
        except Exception:  # extras: the answers stand
            log.exception("caching or tracing a batch failed")
        return isolation.placed(answers, self._place)

    def _place(self, result: Result) -> None:
        """A large body stays here for the API to fetch directly; the rest goes inline."""
        body, meta = result.body, result.meta
        direct = self.settings.result_transport == "direct" and self.url
        if body is None or not direct or body.nbytes <= self.settings.inline_result_bytes:
            return
        token = self.results.put(meta.job_id, body)
        if token is None:  # the store is full: through Redis, as before
            self.metrics.results_inline_full.inc()
            return
        meta.location, meta.token, meta.nbytes = f"{self.url}/results/{meta.job_id}", token, \
            body.nbytes
        result.body = None

    # -- helpers ----------------------------------------------------------------------
    def _live(self, jobs: list[Job]) -> list[Job]:
        """Drop (and answer) jobs nobody waits for: they never reach the GPU."""
        now = time.time()
        for job in jobs:
            self.metrics.queue_wait.observe(max(0.0, now - job.spec.enqueued_at))
        live, answers = isolation.unwaited(jobs, self.waiting)
        self._answer(answers)
        return live

    def _release(self, jobs: list[Job]) -> None:
        """Stop holding jobs this worker cannot run: another takes them over once their
        visibility timeout passes (they stay pending in Redis)."""
        if jobs:
            log.warning("released %d jobs: the fleet serves %s, which this worker does not "
                        "hold", len(jobs), self.claimer.live)
        self.waiting.forget([job.spec.id for job in jobs])
        with self._held_lock:
            self._held.difference_update(job.entry_id for job in jobs)

    def _answer(self, answers: list[Answer]) -> None:
        """Count and store; whatever happens, this worker holds the jobs no more (one
        not stored stays pending in Redis and is reclaimed by a later delivery)."""
        if not answers:
            return
        self.waiting.forget([job.spec.id for job, _ in answers])
        answering.count(self.metrics, answers)
        answering.store(self.jobs.complete, answers, self.settings.request_timeout_s)
        with self._held_lock:
            self._held.difference_update(job.entry_id for job, _ in answers)

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

    def _safe(self, call: Callable[[], T], default: T) -> T:
        """Run a queue call; while Redis is unreachable, log, back off, return `default`."""
        try:
            return call()
        except QueueUnavailable as exc:
            log.warning("redis unavailable: %s", exc)
            time.sleep(BACKOFF_S)
            return default

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

    def _publish_model(self) -> None:
        """Tell the API what this worker serves; retried by the heartbeat until Redis took
        it (a lost SET at a swap would leave /v1/models on the old version)."""
        info = self.model.current.info
        self.metrics.set_model(info.name, info.version)

        def publish() -> bool:
            self.jobs.publish_model(info.model_dump_json())
            return True

        if self._safe(publish, False):
            self._published = info.version

    def _heartbeat_loop(self) -> None:
        """Keep held jobs fresh (more often than the visibility timeout) and heartbeat;
        both stop while a forward is hung, so other workers take the jobs over."""
        period = min(self.settings.heartbeat_s, self.settings.visibility_timeout_s / 3)
        next_beat = 0.0
        while not self._core_done.is_set():
            if self.stuck():
                self._log_stuck()
            else:
                with self._held_lock:
                    held = list(self._held)
                self._safe(lambda ids=held: self.jobs.touch(ids), None)  # type: ignore[misc]
                if time.monotonic() >= next_beat:
                    if self._published != self.model.current.info.version:
                        self._publish_model()
                    self._beat()
                    next_beat = time.monotonic() + self.settings.heartbeat_s
            self._core_done.wait(period)

    def stuck(self) -> bool:
        """A forward pass has run longer than `forward_timeout_s` (a stuck GPU, a lock)."""
        since = self._busy_since
        return since is not None and time.monotonic() - since > self.settings.forward_timeout_s

    def _log_stuck(self) -> None:
        if not self._stuck_logged:
            self._stuck_logged = True
            log.error("the forward pass has run for over %.0f s: giving up its jobs to other "
                      "workers and reporting not alive", self.settings.forward_timeout_s)

    def _beat(self) -> None:
        current = self.model.current
        beat = Heartbeat(
            id=self.jobs.consumer, pid=os.getpid(), host=socket.gethostname(),
            model=current.info.name, version=current.info.version,
            device=device_label(current.device),
            started_at=self.started_at, metrics=self.metrics.render().decode(),
        )
        def send() -> bool:
            self.jobs.heartbeat(beat, self.settings.worker_ttl_s)
            return True

        if self._safe(send, False):
            self.last_heartbeat = time.monotonic()

    def alive(self) -> tuple[bool, str]:
        """For the worker's /healthz: false once a forward is hung (restart me)."""
        if self.stuck():
            return False, "a forward pass is hung"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """For the worker's /readyz: serving, and Redis heard from recently."""
        if self.stopping.is_set():
            return False, "stopping"
        if self.stuck():
            return False, "a forward pass is hung"
        if time.monotonic() - self.last_heartbeat > self.settings.worker_ttl_s:
            return False, "no heartbeat has reached Redis recently"
        lacking = self.claimer.out_of_fleet()
        if lacking is not None:
            return False, f"out of the fleet: it serves {lacking}, which this worker lacks"
        info = self.model.current.info
        return True, f"ready: {info.name} {info.version}"

