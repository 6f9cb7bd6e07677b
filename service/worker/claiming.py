"""Where a worker's next jobs come from, and which model version runs them.

First the jobs a previous life of this worker held (page by page), then jobs other
workers left behind, then new ones. With a fleet switch, nothing is claimed while the
fleet serves a version this worker does not hold, and `live` is read after each claim:
that version runs the batch (switch.py says why this keeps versions from going back).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from cleandift.settings import Settings

from ..messages import Entry, Heartbeat, Job, Result
from ..metrics import WorkerMetrics
from .holder import ModelHolder
from .switch import FleetSwitch

T = TypeVar("T")
CLAIM_BLOCK_MS = 500
Answer = tuple[Job, Result]


class Consumer(Protocol):
    """What the worker needs of its queue (JobConsumer; an in-memory fake in unit tests)."""

    consumer: str

    def claim(self, count: int, block_ms: int) -> list[Job]: ...
    def claim_own_pending(self, count: int, after: str = "0") -> tuple[list[Job], int, str]: ...
    def reclaim(self, count: int) -> tuple[list[Job], int]: ...
    def complete(self, answers: Sequence[Answer]) -> None: ...
    def touch(self, entries: Sequence[Entry]) -> None: ...
    def cancelled(self, job_ids: Sequence[str]) -> set[str]: ...
    def heartbeat(self, beat: Heartbeat, ttl_s: float) -> None: ...
    def leave(self) -> None: ...
    def publish_model(self, info_json: str) -> None: ...


# The version of jobs claimed while Redis could not say which version is live: no
# worker holds it, so the jobs are released, never run with a version that may be old.
UNREAD = "(live version unread)"


class LeftBehind(RuntimeError):
    """The fleet moved to a version this worker cannot load (see `Claimer._left_behind`)."""


class Safe(Protocol):
    def __call__(self, call: Callable[[], T], default: T) -> T: ...


class Claimer:
    def __init__(self, jobs: Consumer, settings: Settings, metrics: WorkerMetrics,
                 holder: ModelHolder, switch: FleetSwitch | None, safe: Safe) -> None:
        self.jobs = jobs
        self.settings, self.metrics, self.holder = settings, metrics, holder
        self.switch, self._safe = switch, safe
        self.live: str | None = None  # the fleet's version, as last read
        self._own_after: str | None = "0"
        self._next_reclaim = 0.0
        self._out_since: float | None = None  # monotonic time it left the fleet

    def out_of_fleet(self) -> str | None:
        """The live version when this worker cannot serve it (it then claims nothing)."""
        live = self.live
        return live if live is not None and self.holder.get(live) is None else None

    def next(self) -> tuple[list[Job], str | None]:
        """(jobs, the version to run them with; None: whatever the worker serves)."""
        if self.switch is not None and (not self._read_live() or self._left_behind()):
            time.sleep(CLAIM_BLOCK_MS / 1000)
            return [], self.live
        jobs = self._claim()
        # After the claim: a job sent after a flip sees the flip. If Redis cannot say,
        # the jobs run with no version of ours: they are released (still pending).
        if jobs and self.switch is not None and not self._read_live():
            return jobs, UNREAD
        return jobs, self.live

    def _left_behind(self) -> bool:
        """Out of the fleet: claim nothing. For longer than a switch may take, raise: the
        worker stops, and its restart (serve's supervisor, Kubernetes) loads the live
        version alone, which fits where two versions side by side did not."""
        if not self.out_of_fleet():
            self._out_since = None
            return False
        now = time.monotonic()
        self._out_since = self._out_since or now
        if now - self._out_since > self.settings.switch_timeout_s:
            raise LeftBehind(f"out of the fleet for {now - self._out_since:.0f} s: it serves "
                             f"{self.live}, which this worker could not load; stopping, so "
                             "that a fresh start loads it")
        return True

    def _read_live(self) -> bool:
        """Read the fleet's version; False when Redis could not say."""
        assert self.switch is not None
        serving = self.holder.current.info.version
        live = self._safe(functools.partial(self.switch.live, serving), None)
        if live is None:
            return False
        self.live = live
        return True

    def _claim(self) -> list[Job]:
        jobs, max_batch = self.jobs, self.settings.max_batch
        if self._own_after is not None:
            nothing_own: tuple[list[Job], int, str] = ([], 0, "")
            own, dead, last = self._safe(
                functools.partial(jobs.claim_own_pending, max_batch, self._own_after),
                nothing_own)
            self._own_after = last or None
            own = self._count_retries(own, dead)
            if own or self._own_after is not None:  # a page of deleted entries: the next
                return own  # page first, or new claims would be read back as own
        if time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + self.settings.visibility_timeout_s / 4
            nothing: tuple[list[Job], int] = ([], 0)
            taken = self._count_retries(*self._safe(
                functools.partial(jobs.reclaim, max_batch), nothing))
            if taken:
                return taken
        return self._safe(lambda: jobs.claim(max_batch, CLAIM_BLOCK_MS), [])

    def _count_retries(self, jobs: list[Job], dead: int) -> list[Job]:
        self.metrics.retried.inc(len(jobs))
        self.metrics.dead.inc(dead)
        return jobs
