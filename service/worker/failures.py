"""One job's failure as its own answer, with the status and text the client gets."""

from __future__ import annotations

import logging
import uuid

from cleandift.contract import RequestError
from cleandift.extractor import Stopped
from cleandift.matching import DeadlinePassed

from ..messages import Job, Result, failure

log = logging.getLogger(__name__)
DEADLINE_MESSAGE = "the deadline passed before a worker finished the job"
CANCELLED_MESSAGE = "the client went away: the job was cancelled"


def internal_error(job_id: str, stage: str) -> Result:
    """A 500 whose text names the stage and an id to find the traceback in the worker's
    log; the exception's own text (paths, addresses) never reaches the client."""
    error_id = uuid.uuid4().hex[:12]
    log.exception("%s failed for job %s (error id %s)", stage, job_id, error_id)
    return failure(job_id, 500, f"the worker's {stage} failed (error id {error_id}; the "
                                "worker log has the details)")


def job_failure(job_id: str, stage: str, exc: BaseException) -> Result:
    """One job's fault as its own answer: what the stages cannot do for this request is
    the client's (422, with its message), a passed deadline 504, anything else a 500 with
    an error id (the exception's text stays in the worker's log)."""
    if isinstance(exc, RequestError):
        return failure(job_id, 422, str(exc))
    if isinstance(exc, DeadlinePassed | Stopped):
        return failure(job_id, 504, DEADLINE_MESSAGE)
    error_id = uuid.uuid4().hex[:12]
    log.error("%s failed for job %s (error id %s)", stage, job_id, error_id, exc_info=exc)
    return failure(job_id, 500, f"the worker's {stage} failed (error id {error_id}; the "
                                "worker log has the details)")


def failed(jobs: list[Job], status: int, message: str) -> list[tuple[Job, Result]]:
    return [(job, failure(job.spec.id, status, message)) for job in jobs]
