"""What a worker holds, and how it shows that it is alive.

The held set is every claimed entry not yet answered; the heartbeat thread touches those
entries in Redis more often than the visibility timeout, so nobody reclaims them while
this worker works, and sends the worker's heartbeat (its model, version and metrics).
Both stop while a forward pass hangs: the jobs then time out to other workers, and the
probes on the worker's port say not alive (restart me) and not ready.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from typing import TypeVar

from cleandift.settings import Settings

from ..messages import Entry, Heartbeat
from ..metrics import WorkerMetrics, device_label
from ..queue.errors import QueueUnavailable
from .claiming import Claimer, Consumer
from .holder import ModelHolder
from .results import ResultStore
from .server import advertised_host, serve_worker_http

log = logging.getLogger(__name__)
BACKOFF_S = 1.0
T = TypeVar("T")


def safe(call: Callable[[], T], default: T) -> T:
    """Run a queue call; while Redis is unreachable, log, back off, return `default`."""
    try:
        return call()
    except QueueUnavailable as exc:
        log.warning("redis unavailable: %s", exc)
        time.sleep(BACKOFF_S)
        return default


class Lease:
    def __init__(self, settings: Settings, jobs: Consumer, metrics: WorkerMetrics,
                 model: ModelHolder, claimer: Claimer, stopping: threading.Event) -> None:
        self.settings, self.jobs, self.metrics, self.model = settings, jobs, metrics, model
        self.claimer, self.stopping = claimer, stopping
        self.held: set[Entry] = set()  # entries claimed and not yet answered
        self._lock = threading.Lock()
        self.started_at = time.time()
        self.last_heartbeat = 0.0  # monotonic time of the last heartbeat Redis accepted
        self._busy_since: float | None = None  # monotonic start of the running forward
        self._published: str | None = None  # the version Redis last accepted from us
        self._stuck_logged = False
        self.url = ""  # where the API fetches held results (set when the port is open)
        self._http: ThreadingHTTPServer | None = None

    # -- the held set -----------------------------------------------------------------
    def hold(self, entries: Iterable[Entry]) -> None:
        with self._lock:
            self.held.update(entries)

    def let_go(self, entries: Iterable[Entry]) -> None:
        with self._lock:
            self.held.difference_update(entries)

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Around a forward pass: one that outlasts `forward_timeout_s` is hung."""
        self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._busy_since = None

    # -- heartbeat ----------------------------------------------------------------------
    def run(self, done: threading.Event) -> None:
        """Until `done`: touch the held entries (more often than the visibility timeout),
        heartbeat, and publish the model until Redis took it (a lost SET at a swap would
        leave /v1/models on the old version)."""
        period = min(self.settings.heartbeat_s, self.settings.visibility_timeout_s / 3)
        next_beat = 0.0
        while not done.is_set():
            if self.stuck():
                self._log_stuck()
            else:
                with self._lock:
                    held = list(self.held)
                safe(lambda entries=held: self.jobs.touch(entries), None)  # type: ignore[misc]
                if time.monotonic() >= next_beat:
                    if self._published != self.model.current.info.version:
                        self.publish_model()
                    self._beat()
                    next_beat = time.monotonic() + self.settings.heartbeat_s
            done.wait(period)

    def publish_model(self) -> None:
        """Tell the API what this worker serves."""
        info = self.model.current.info
        self.metrics.set_model(info.name, info.version)

        def publish() -> bool:
            self.jobs.publish_model(info.model_dump_json())
            return True

        if safe(publish, False):
            self._published = info.version

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

        if safe(send, False):
            self.last_heartbeat = time.monotonic()

    def stuck(self) -> bool:
        """A forward pass has run longer than `forward_timeout_s` (a stuck GPU, a lock)."""
        since = self._busy_since
        return since is not None and time.monotonic() - since > self.settings.forward_timeout_s

    def _log_stuck(self) -> None:
        if not self._stuck_logged:
            self._stuck_logged = True
            log.error("the forward pass has run for over %.0f s: giving up its jobs to other "
                      "workers and reporting not alive", self.settings.forward_timeout_s)

    # -- probes and the port ------------------------------------------------------------
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

    def facts(self) -> dict[str, object]:
        """The API's /readyz fields, for this one worker."""
        info = self.model.current.info
        return {"workers": 1, "model": info.name, "model_version": info.version,
                "models": {info.name: info.version}}

    def open_port(self, results: ResultStore) -> None:
        """The worker's HTTP port: probes, metrics and held results (0: any free port)."""
        settings = self.settings
        try:
            self._http = serve_worker_http(settings.worker_port, self.metrics.render,
                                           self.ready, self.alive, host=settings.host,
                                           results=results, facts=self.facts,
                                           idle_timeout_s=settings.worker_idle_timeout_s)
        except OSError as exc:  # results then travel through Redis; metrics by heartbeat
            log.warning("worker port %d unavailable: %s", settings.worker_port, exc)
            return
        host = settings.worker_advertise_host or advertised_host(settings.host)
        self.url = f"http://{host}:{self._http.server_address[1]}"

    def close_port(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
