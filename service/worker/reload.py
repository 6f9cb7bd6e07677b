"""Hot reload: a worker serving a registry model (DIR/NAME) follows its LATEST version.

A new version is loaded beside the live one, verified (checksums, strict keys, a finite
smoke forward) and only then offered to the forward thread, which swaps between batches.
A broken version is refused and counted; the old one keeps serving. The trainer's Redis
announcement triggers a check at once; a periodic look at LATEST covers lost messages.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import redis

from cleandift import registry
from cleandift.extractor import Extractor

from ..metrics import WorkerMetrics
from .holder import ModelHolder

log = logging.getLogger(__name__)


def watched_model_dir(spec: str | None) -> Path | None:
    """DIR/NAME when the spec follows a registry model's LATEST (not a pinned version)."""
    if not spec:
        return None
    path = Path(spec)
    return path if (path / registry.LATEST).is_file() else None


class RegistryWatcher:
    def __init__(self, model_dir: Path, holder: ModelHolder, load: Callable[[Path], Extractor],
                 metrics: WorkerMetrics, *, poll_s: float, client: redis.Redis | None,
                 channel: str) -> None:
        self.model_dir, self.holder, self.load, self.metrics = model_dir, holder, load, metrics
        self.poll_s, self.client, self.channel = poll_s, client, channel
        self.stopping = threading.Event()
        self._refused: set[str] = set()
        self._offered: str | None = None
        self.thread = threading.Thread(target=self._run, name="registry-watcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def check(self) -> None:
        """Load LATEST if it is new; offer it to the holder or refuse it."""
        version = registry.latest_version(self.model_dir)
        live = self.holder.current.info.version
        if version in (None, live, self._offered) or version in self._refused:
            return
        log.info("new version %s of %s (serving %s): loading beside it", version,
                 self.model_dir.name, live)
        try:
            candidate = self.load(self.model_dir / version)  # loaded, compiled if asked, checked
        except Exception as exc:  # any failure keeps the old model serving
            self._refused.add(version)
            self.metrics.reloads.labels(result="failed").inc()
            log.error("refused %s %s: %s", self.model_dir.name, version, exc)
            return
        self._offered = version
        self.holder.offer(candidate)
        self.metrics.reloads.labels(result="ok").inc()

    def _run(self) -> None:
        pubsub = None
        while not self.stopping.is_set():
            try:
                if pubsub is None and self.client is not None:
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.channel)
                if pubsub is not None:
                    message = pubsub.get_message(timeout=self.poll_s)
                    if message and not self._concerns_us(message["data"]):
                        continue
                else:
                    self.stopping.wait(self.poll_s)
            except redis.RedisError as exc:  # fall back to polling until Redis is back
                log.warning("registry channel unavailable (%s); polling", exc)
                pubsub = None
                self.stopping.wait(self.poll_s)
            self.check()

    def _concerns_us(self, data: bytes) -> bool:
        try:
            message = json.loads(data)
            return Path(message["registry"]).resolve() / message["name"] == self.model_dir.resolve()
        except (ValueError, KeyError, TypeError):
            return False
