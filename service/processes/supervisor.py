"""`serve`'s supervisor: every child process (workers, the private redis-server) is
restarted when it dies, with exponential back-off and a log line saying why; a worker
whose process lives but whose heartbeat stopped (a hung forward pass) is killed and
restarted too.

A dead worker is forgotten in Redis at once (the API then answers 503 instead of queuing
work nobody takes), and it comes back under the same name, so it picks up the jobs its
previous life held without waiting for the visibility timeout.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)
POLL_S = 0.2
MIN_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0
STABLE_S = 60.0  # a child that ran this long starts its back-off afresh
STOP_TIMEOUT_S = 30.0


@dataclass
class Child:
    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    on_exit: Callable[[], None] | None = None  # e.g. forget a dead worker in Redis
    heartbeat_age: Callable[[], float | None] | None = None  # seconds, None when unknown
    tier: int = 1  # stopped after every child of a higher tier (Redis 0: workers drain into it)
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    failures: int = 0
    seen_alive: bool = False
    restarts: int = 0


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    def __init__(self, children: list[Child], *, hung_after_s: float) -> None:
        self.children, self.hung_after_s = children, hung_after_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> None:
        for child in self.children:
            self._launch(child)
        self._thread.start()

    def stop(self) -> None:
        """SIGTERM the children tier by tier, highest first (workers finish what they hold
        and answer it into Redis before Redis stops), waiting for each tier, then kill."""
        self._stopping.set()
        self._thread.join(timeout=5)
        for tier in sorted({c.tier for c in self.children}, reverse=True):
            running = [c.process for c in self.children
                       if c.tier == tier and c.process and c.process.poll() is None]
            for process in running:
                process.send_signal(signal.SIGTERM)
            for process in running:
                try:
                    process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()

    def _run(self) -> None:
        while not self._stopping.wait(POLL_S):
            for child in self.children:
                try:
                    self._check(child)
                except Exception:  # the supervisor itself must never die
                    log.exception("supervising %s failed", child.name)

    def _check(self, child: Child) -> None:
        now = time.monotonic()
        if child.process is None:
            if now >= child.restart_at:
                self._launch(child)
            return
        code = child.process.poll()
        if code is not None:
            self._died(child, f"{describe_exit(code)}")
        elif child.heartbeat_age is not None:
            age = child.heartbeat_age()
            if age is not None and age < self.hung_after_s:
                child.seen_alive = True
            elif age is not None and child.seen_alive:
                child.process.kill()  # hung: its forward or its threads are stuck
                child.process.wait()
                self._died(child, f"stopped sending heartbeats ({age:.0f} s) and was killed")

    def _died(self, child: Child, why: str) -> None:
        now = time.monotonic()
        assert child.process is not None
        if now - child.started_at >= STABLE_S:
            child.failures = 0
        delay = min(MAX_BACKOFF_S, MIN_BACKOFF_S * 2 ** child.failures)
        child.failures += 1
        log.error("%s (pid %d) %s; restarting it in %.0f s", child.name, child.process.pid,
                  why, delay)
        child.process, child.restart_at, child.seen_alive = None, now + delay, False
        if child.on_exit is not None:
            try:
                child.on_exit()
            except Exception as exc:  # Redis may be the one that died
                log.warning("could not mark %s gone: %s", child.name, exc)

    def _launch(self, child: Child) -> None:
        child.process, child.started_at = child.start(), time.monotonic()
        if child.restarts:
            log.info("restarted %s (pid %d, restart %d)", child.name, child.process.pid,
                     child.restarts)
        child.restarts += 1
