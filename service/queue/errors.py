"""What can go wrong between the API and the queue; routes map each to one status."""

from __future__ import annotations

from typing import Any


class QueueError(Exception):
    pass


class QueueUnavailable(QueueError):
    """Redis cannot be reached (or answered with an error): 503."""


class PartiallyStored(QueueUnavailable):
    """Some answers were stored; `left` (of another partition, whose node is away) were
    not: only those are tried again."""

    def __init__(self, message: str, left: list[Any]) -> None:  # (Job, Result) pairs
        super().__init__(message)
        self.left = left


class QueueFull(QueueError):
    """The stream already holds `max_queue` jobs: 429."""


class NoLiveWorker(QueueError):
    """No worker has sent a heartbeat recently: nobody would take the job (503)."""


class NoAnswerByDeadline(QueueError):
    """No worker answered before the job's deadline: 504 (the client's DeadlineExceeded;
    a worker's own deadline checks are matching.DeadlinePassed and extractor.Stopped)."""


class ClientGone(QueueError):
    """The client closed the connection while its job waited: the job is cancelled (499,
    logged and counted; nobody reads it)."""
