"""Process-level helpers for the fault tests."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import redis

from cleandift.bench.load import LoadResult, features_request, run_load
from cleandift.service.queue.keys import Keys
from tests.corpus import encode, textured_image

IMAGE = encode(textured_image(320, 240, 3), "JPEG")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class Background:
    """run_load on a thread; `result` once joined."""

    def __init__(self, url: str, fields: dict[str, str] | None = None, **kwargs) -> None:
        self.result: LoadResult | None = None
        kwargs.setdefault("timeout_s", 60.0)
        request = features_request(IMAGE, **(fields or {}))
        self.thread = threading.Thread(
            target=lambda: setattr(self, "result", run_load(url, request, **kwargs)),
            daemon=True)
        self.thread.start()

    def join(self, timeout: float = 120) -> LoadResult:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the load did not finish: a request hung"
        assert self.result is not None
        return self.result


def pending_by_consumer(redis_url: str, prefix: str) -> dict[str, int]:
    keys = Keys(prefix)
    try:
        summary = redis.Redis.from_url(redis_url).xpending(keys.jobs, keys.group)
    except redis.RedisError:
        return {}
    return {c["name"].decode(): int(c["pending"]) for c in summary.get("consumers") or []}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def status(url: str, path: str) -> int:
    try:
        return httpx.get(url + path, timeout=5).status_code
    except httpx.HTTPError:
        return 0
