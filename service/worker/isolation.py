"""One job's fault fails that job alone, after batching.

Batching puts strangers in one forward pass; without this, one request the stages cannot
serve (a bad parameter, pixels that do not fit, a job that breaks the model) answered
its whole batch 500. Here every stage falls back to smaller units when a batch fails:

- intake: a job whose spec cannot be batched (unknown layers) is answered on its own;
- pre: a batch whose pixels cannot be stacked is bisected down to the job that breaks it;
- forward: jobs nobody waits for are answered before it (a stage boundary): 504 past
  their deadline, 499 when their client went away (waiting.py); a batched forward that
  raises is retried in halves before one job is blamed (an out-of-memory batch often
  runs in halves); a forward stopped because nobody waits for any of its jobs (between
  DIFT passes) is answered so, not retried;
- post: post.py notes each job's output failure on its own; a result that cannot be
  placed or encoded fails alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from cleandift.contract import validate_layers
from cleandift.extractor import Extractor, Stopped

from ..messages import CLIENT_CLOSED, Job, Result
from . import failures, post, stages
from .batching import Batch, batch_of
from .waiting import Waiting

log = logging.getLogger(__name__)
Answer = tuple[Job, Result]


def batchable(jobs: list[Job]) -> tuple[list[Job], list[Answer]]:
    """(jobs a batch can be built from, answers for the others): known layers, and each
    image the uint8 square the job's input size says, or one upload per image (a corrupt
    or foreign message fails alone)."""
    good: list[Job] = []
    answers: list[Answer] = []
    for job in jobs:
        try:
            validate_layers(job.spec.layers, [])
            side = job.spec.input_size
            if job.uploads:  # decoded next (decoding.py), into pixels of that shape
                if len(job.uploads) != len(job.spec.image_sizes):
                    raise ValueError("one upload per image size is required")
            elif not job.images or any(im.shape != (side, side, 3) or im.dtype != np.uint8
                                     for im in job.images):
                raise ValueError(f"images are not {side}x{side}x3 uint8")
            good.append(job)
        except Exception as exc:  # a message the batcher cannot read
            answers.append((job, failures.job_failure(job.spec.id, "intake", exc)))
    return good, answers


def prepare(batch: Batch, pin: bool) -> tuple[list[stages.Prepared], list[Answer]]:
    """The batch prepared whole, or bisected until each part prepares or is one job."""
    try:
        return [stages.prepare(batch, pin)], []
    except Exception as exc:
        if len(batch.jobs) == 1:
            job = batch.jobs[0]
            return [], [(job, failures.job_failure(job.spec.id, "pre-processing", exc))]
    ready: list[stages.Prepared] = []
    answers: list[Answer] = []
    for half in batch.halves():
        more, failed = prepare(half, pin)
        ready += more
        answers += failed
    return ready, answers


def unwaited(jobs: list[Job], waiting: Waiting) -> tuple[list[Job], list[Answer]]:
    """(the jobs somebody waits for, answers for the others: 504 past the deadline, 499
    for a client that went away)."""
    expired = waiting.expired(jobs)
    cancelled = waiting.cancelled([job for job in jobs if job not in expired])
    answers = (failures.failed(expired, 504, failures.DEADLINE_MESSAGE)
               + failures.failed(cancelled, CLIENT_CLOSED, failures.CANCELLED_MESSAGE))
    return [job for job in jobs if job not in expired and job not in cancelled], answers


def forward(prepared: stages.Prepared, extractor: Extractor, pin: bool, waiting: Waiting
            ) -> tuple[list[stages.Computed], list[Answer]]:
    """(what was computed, answers for the jobs that failed or nobody waits for): the
    forward of the live jobs, bisected on failure down to the job that fails."""
    jobs = prepared.batch.jobs
    live, answers = unwaited(jobs, waiting)
    if answers:
        return _retry(batch_of(live), extractor, pin, waiting, answers) if live else ([], answers)
    try:
        return [stages.forward(prepared, extractor, waiting.nobody_waits(jobs))], []
    except Stopped:  # nobody waited for any of them: past their deadline, or gone
        expired = waiting.expired(jobs)
        return [], (failures.failed(expired, 504, failures.DEADLINE_MESSAGE) + failures.failed(
            [job for job in jobs if job not in expired], CLIENT_CLOSED,
            failures.CANCELLED_MESSAGE))
    except Exception as exc:
        if len(jobs) == 1:
            return [], [(jobs[0], failures.job_failure(jobs[0].spec.id, "forward pass", exc))]
        log.warning("a forward pass of %d jobs failed (%s: %s): retrying them in halves",
                    len(jobs), type(exc).__name__, exc)
    computed: list[stages.Computed] = []
    answers = []
    for half in prepared.batch.halves():
        more, failed = _retry(half, extractor, pin, waiting, [])
        computed += more
        answers += failed
    return computed, answers


def _retry(batch: Batch, extractor: Extractor, pin: bool, waiting: Waiting,
           answers: list[Answer]) -> tuple[list[stages.Computed], list[Answer]]:
    ready, failed = prepare(batch, pin)
    computed: list[stages.Computed] = []
    answers = answers + failed
    for part in ready:
        more, failed = forward(part, extractor, pin, waiting)
        computed += more
        answers += failed
    return computed, answers


def results(computed: stages.Computed, limits: post.MatchLimits, waiting: Waiting
            ) -> list[Answer]:
    """Each job's answer; if the post stage fails as a whole, each job is told so."""
    try:
        return post.results(computed, limits, waiting.gone)
    except Exception as exc:
        return [(job, failures.job_failure(job.spec.id, "post-processing", exc))
                for job in computed.prepared.batch.jobs]


def placed(answers: list[Answer], place: Callable[[Result], None]) -> list[Answer]:
    """`place` each result (the worker's store, or inline); one that fails fails alone."""
    out: list[Answer] = []
    for job, result in answers:
        try:
            place(result)
            out.append((job, result))
        except Exception as exc:
            out.append((job, failures.job_failure(job.spec.id, "result store", exc)))
    return out


def encodable(answers: list[Answer]) -> list[Answer]:
    """The answers with any that cannot be written to Redis replaced by its 500."""
    out: list[Answer] = []
    for job, result in answers:
        try:
            result.to_fields()
            out.append((job, result))
        except Exception as exc:
            out.append((job, failures.job_failure(job.spec.id, "result encoding", exc)))
    return out
