"""Large results, held by the worker that computed them until the API fetches them.

A result of several megabytes crosses one socket, worker -> API, instead of being written
into Redis and read back. The API is told where to fetch it (a small record in Redis, as
for any result) and fetches it once; what nobody fetches within `hold_s` is dropped. The
store is bounded in bytes: when it is full, results go through Redis as before.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass


@dataclass
class Held:
    token: str
    body: memoryview
    expires: float


class ResultStore:
    def __init__(self, max_bytes: int, hold_s: float) -> None:
        self.max_bytes, self.hold_s = max_bytes, hold_s
        self.used = 0
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()

    def put(self, job_id: str, body: memoryview) -> str | None:
        """Hold `body` for one fetch; returns its token, or None when there is no room."""
        with self._lock:
            self._sweep()
            old = self._held.pop(job_id, None)  # a job stored again (run twice): the new
            if old is not None:                 # body replaces the old one, counted once
                self.used -= old.body.nbytes
            if self.used + body.nbytes > self.max_bytes:
                return None
            token = secrets.token_hex(16)
            self._held[job_id] = Held(token, body, time.monotonic() + self.hold_s)
            self.used += body.nbytes
            return token

    def take(self, job_id: str, token: str) -> memoryview | None:
        """The body, removed from the store (a result is fetched once); None if unknown,
        expired or the token is wrong."""
        with self._lock:
            held = self._held.get(job_id)
            if held is None or not secrets.compare_digest(held.token, token):
                return None
            del self._held[job_id]
            self.used -= held.body.nbytes
            return held.body if held.expires > time.monotonic() else None

    def _sweep(self) -> None:
        now = time.monotonic()
        for job_id in [j for j, h in self._held.items() if h.expires <= now]:
            self.used -= self._held.pop(job_id).body.nbytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)
