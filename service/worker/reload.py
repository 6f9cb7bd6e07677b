"""Hot reload: a worker serving a registry model (DIR/NAME) follows its LATEST version.

A new version is loaded beside the live one, verified (checksums, strict keys, a finite
smoke forward) and only then offered to the forward thread, which swaps between batches.
A broken version is refused and counted; the old one keeps serving. The trainer's Redis
announcement triggers a check at once; a periodic look at LATEST covers lost messages.
With a FleetSwitch (switch.py) the loaded version is staged, and served only once the
model's whole fleet has it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from cleandift import registry
from cleandift.extractor import Extractor

from ..metrics import WorkerMetrics
from ..queue.connect import REDIS_ERRORS
from ..queue.errors import QueueUnavailable
from .holder import ModelHolder
from .switch import FleetSwitch

log = logging.getLogger(__name__)
WAKE_S = 0.25  # longest a stop() waits for the watcher's loop to notice
STOP_WAIT_S = 60.0  # longest a stop() waits for a version being loaded


def watched_model_dir(spec: str | None) -> Path | None:
    """DIR/NAME when the spec follows a registry model's LATEST (not a pinned version)."""
    if not spec:
        return None
    path = Path(spec)
    return path if (path / registry.LATEST).is_file() else None


class RegistryWatcher:
    def __init__(self, model_dir: Path, holder: ModelHolder, load: Callable[[Path], Extractor],
                 metrics: WorkerMetrics, *, poll_s: float, client: redis.Redis | None,
                 channel: str, switch: FleetSwitch | None = None) -> None:
        self.model_dir, self.holder, self.load, self.metrics = model_dir, holder, load, metrics
        self.poll_s, self.client, self.channel = poll_s, client, channel
        self.switch = switch
        self.stopping = threading.Event()
        self._refused: set[str] = set()
        self._offered: str | None = None
        self.thread = threading.Thread(target=self._run, name="registry-watcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop and wait: a watcher that outlived its worker would go on polling a Redis
        that may be gone, and load versions for nobody."""
        self.stopping.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=STOP_WAIT_S)
            if self.thread.is_alive():
                log.warning("registry watcher still loading after %.0f s; left behind",
                            STOP_WAIT_S)

    def check(self) -> None:
        """Load LATEST if it is new; offer it to the holder or refuse it; tell the fleet."""
        version = registry.latest_version(self.model_dir)
        live = self.holder.current.info.version
        if version is None:
            return
        if version in (live, self._offered) or version in self._refused:
            self._tell_fleet(version, version not in self._refused)
            return
        log.info("new version %s of %s (serving %s): loading beside it", version,
                 self.model_dir.name, live)
        try:
            candidate = self.load(self.model_dir / version)  # loaded, compiled if asked, checked
        except Exception as exc:  # any failure keeps the old model serving
            self._refused.add(version)
            self.metrics.reloads.labels(result="failed").inc()
            log.error("refused %s %s: %s", self.model_dir.name, version, exc)
            self._tell_fleet(version, False)
            return
        self._offered = version
        self.holder.offer(candidate)
        self.metrics.reloads.labels(result="ok").inc()
        self._tell_fleet(version, True)

    def _tell_fleet(self, version: str, ready: bool) -> None:
        """Stage the version (or say it failed here); repeated on every check, so the
        switch also completes when the last worker to stage it died meanwhile."""
        if self.switch is None:
            return
        try:
            if ready:
                self.switch.stage(version, self.holder.current.info.version)
            else:
                self.switch.failed(version)
        except QueueUnavailable as exc:
            log.warning("could not tell the fleet about %s: %s", version, exc)

    def _run(self) -> None:
        """Check at once on an announcement, and every poll_s anyway; wake at least every
        WAKE_S so that stop() is prompt whatever poll_s is."""
        pubsub: Any = None
        next_poll = 0.0
        wake = min(self.poll_s, WAKE_S)
        degraded = False  # said once per outage, not on every retry
        try:
            while not self.stopping.is_set():
                announced = False
                try:
                    if pubsub is None and self.client is not None:
                        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                        pubsub.subscribe(self.channel)
                    if pubsub is not None:
                        message = pubsub.get_message(timeout=wake)
                        announced = bool(message) and self._concerns_us(message["data"])
                        degraded = False
                    else:
                        self.stopping.wait(wake)
                except REDIS_ERRORS as exc:  # fall back to polling until Redis is back
                    if not degraded:
                        log.warning("registry channel unavailable (%s); polling", exc)
                    degraded = True
                    _close(pubsub)
                    pubsub = None
                    self.stopping.wait(wake)
                if announced or time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.poll_s
                    try:
                        self.check()
                    except Exception:  # an unreadable LATEST must not end the watching
                        log.exception("checking %s for a new version failed", self.model_dir)
        finally:
            _close(pubsub)

    def _concerns_us(self, data: bytes) -> bool:
        try:
            message = json.loads(data)
            return Path(message["registry"]).resolve() / message["name"] == self.model_dir.resolve()
        except (ValueError, KeyError, TypeError):
            return False


def _close(pubsub: Any) -> None:
    """Close a subscription, quietly: it is dropped because Redis failed or we stop."""
    if pubsub is not None:
        with contextlib.suppress(*REDIS_ERRORS):
            pubsub.close()
