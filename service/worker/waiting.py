"""Whether anybody still waits for a job: its deadline has not passed, and the API has not
cancelled it (its client went away: `Keys.cancelled`). Work nobody waits for stops at the
next stage boundary: before batching, before the forward, between the passes of a DIFT
ensemble, and between blocks of the match search.

The stages never wait on Redis for this: a thread of its own asks about the jobs the
worker holds every `poll_s`, and the stages read what it last saw. (A slow or hung Redis
would otherwise stall the forward inside every check.) Intake asks once, right away, for
the jobs it has just claimed. A cancellation never comes undone; a job is forgotten only
once it has been answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from cleandift.extractor import StopCheck

from ..messages import Job

log = logging.getLogger(__name__)


class Waiting:
    """The worker's one view of which jobs still have a client (shared by its stages)."""

    def __init__(self, cancelled: Callable[[Sequence[str]], set[str]], poll_s: float) -> None:
        self._ask, self.poll_s = cancelled, poll_s
        self._held: set[str] = set()  # job ids asked about (claimed, not yet answered)
        self._gone: set[str] = set()  # those seen cancelled
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cancel-poll", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the poller (it may be inside a Redis call: its socket timeout bounds it)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def watch(self, jobs: Sequence[Job]) -> None:
        """Jobs just claimed: asked about now (this thread may wait on Redis: intake's),
        then by the poller until they are answered."""
        ids = [job.spec.id for job in jobs]
        with self._lock:
            self._held.update(ids)
        self._refresh(ids)

    def forget(self, job_ids: Sequence[str]) -> None:
        """Answered jobs: nobody needs to ask about them any more."""
        with self._lock:
            self._held.difference_update(job_ids)
            self._gone.difference_update(job_ids)

    def cancelled(self, jobs: Sequence[Job]) -> list[Job]:
        """The jobs whose client went away, as last seen (never waits on Redis)."""
        with self._lock:
            return [job for job in jobs if job.spec.id in self._gone]

    def expired(self, jobs: Sequence[Job]) -> list[Job]:
        now = time.time()
        return [job for job in jobs if 0 < job.spec.deadline < now]

    def nobody_waits(self, jobs: Sequence[Job]) -> StopCheck:
        """A batch's forward may stop once no job of it has a client waiting."""

        def check() -> bool:
            expired = self.expired(jobs)
            live = [job for job in jobs if job not in expired]
            return len(self.cancelled(live)) == len(live)

        return check

    def gone(self, job: Job) -> StopCheck:
        """One job's search may stop once its client went away."""
        return lambda: bool(self.cancelled([job]))

    def _refresh(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        try:
            found = self._ask(ids)
        except Exception as exc:  # an outage is the loop's business: nobody counts as gone
            log.debug("asking for cancelled jobs failed: %s", exc)
            return
        with self._lock:
            self._gone.update(found & self._held)

    def _run(self) -> None:
        while not self._stopping.wait(self.poll_s):
            with self._lock:
                ids = sorted(self._held - self._gone)
            self._refresh(ids)

