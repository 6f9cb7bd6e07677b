"""Answers into Redis: counted once, then stored, riding out a Redis outage while their
deadline could still matter; an answer that cannot be written fails alone."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from ..messages import CLIENT_CLOSED, Job, Result
from ..metrics import WorkerMetrics
from ..queue.errors import PartiallyStored, QueueUnavailable
from . import isolation, post

log = logging.getLogger(__name__)
Answer = tuple[Job, Result]
RETRY_S = 0.5  # between two tries to store answers while Redis is unreachable


def count(metrics: WorkerMetrics, answers: Sequence[Answer]) -> None:
    """Every answer by kind and status; 504s, cancellations and unproven matches too."""
    for job, result in answers:
        status = result.meta.status
        metrics.jobs.labels(kind=job.spec.kind, status=str(status)).inc()
        metrics.inexact_matches.inc(post.inexact_matches(result.meta))
        metrics.expired.inc(status == 504)
        metrics.cancelled.inc(status == CLIENT_CLOSED)
        if status >= 500:
            log.warning("job %s answered %d: %s", job.spec.id, status, result.meta.error,
                        extra={"request_id": job.spec.request_id or "-"})


def store(complete: Callable[[Sequence[Answer]], None], answers: list[Answer],
          give_up_s: float) -> None:
    """Store (and acknowledge) the answers. While Redis is unreachable, retry for
    `give_up_s` (then the jobs stay pending, and another delivery answers them); if
    writing fails otherwise, the answers that cannot be encoded become their 500s, once."""
    deadline, checked = time.monotonic() + give_up_s, False
    while True:
        try:
            complete(answers)
            return
        except QueueUnavailable as exc:
            if isinstance(exc, PartiallyStored):  # the rest were stored: not twice
                answers = exc.left
            if time.monotonic() > deadline:
                log.error("dropping %d answers: Redis unreachable (%s)", len(answers), exc)
                return
            log.warning("storing results failed (%s); retrying", exc)
            time.sleep(RETRY_S)
        except Exception:
            if checked:  # not an answer's fault: left pending, another delivery runs it
                log.exception("storing %d answers failed", len(answers))
                return
            answers, checked = isolation.encodable(answers), True
