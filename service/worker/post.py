"""The post stage: each job's answer from a computed batch (feature bytes, or matches
computed next to the features), each job on its own, and the batch's trace spans.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cleandift.extractor import StopCheck
from cleandift.matching import DeadlinePassed, Limits, Refinement, correspond, similarity_map

from .. import tracing
from ..messages import (
    CLIENT_CLOSED,
    Heatmap,
    Job,
    JobSpec,
    Result,
    ResultMeta,
    TargetMatches,
    failure,
)
from .failures import CANCELLED_MESSAGE, DEADLINE_MESSAGE, internal_error, job_failure
from .stages import Computed, layout, stage_outputs


def finish(computed: Computed) -> None:
    """In the post stage: wait for the GPU's copies (CUDA), or make the copies (CPU)."""
    if computed.events is not None:
        begin, done = computed.events
        done.synchronize()
        computed.inference_s = begin.elapsed_time(done) / 1000
        wall = computed.prepared.marks["forward"][0]
        computed.prepared.marks["forward"] = (wall, wall + computed.inference_s)
    else:
        computed.outputs = stage_outputs(computed)


@dataclass(frozen=True)
class MatchLimits:
    """What one /correspond may spend proving DIFT's argmax (Settings.match_*)."""

    max_pixels: int | None = None
    answer_margin_s: float = 0.0


def results(computed: Computed, limits: MatchLimits = MatchLimits(),
            gone: Callable[[Job], StopCheck] | None = None) -> list[tuple[Job, Result]]:
    """Per-job results: raw feature bytes, or matches computed next to the features.
    One job's failure answers that job only; its batch-mates are answered normally.
    `gone(job)` says its client went away: its match search stops."""
    finish(computed)
    batch = computed.prepared.batch
    return [(job, job_result(job, index, rows, computed, limits,
                             gone(job) if gone is not None else None))
            for index, (job, rows) in enumerate(zip(batch.jobs, batch.rows()))]


def trace(computed: Computed, post_started: float) -> None:
    """Each job's worker stages as spans of its request's trace (no-op when untraced)."""
    prepared = computed.prepared
    worker_stages = [(name, *span) for name, span in prepared.marks.items()]
    worker_stages.append(("post", post_started, time.time()))
    for job in prepared.batch.jobs:
        tracing.record_stages(
            job.spec.trace, [("queue wait", job.spec.enqueued_at, prepared.started),
                             *worker_stages],
            **{"cleandift.job_id": job.spec.id, "cleandift.cached": computed.cached,
               "cleandift.batch_images": len(prepared.batch.images),
               "cleandift.model": computed.extractor.info.name,
               "cleandift.model_version": computed.extractor.info.version})


def job_result(job: Job, index: int, rows: slice, computed: Computed,
               limits: MatchLimits = MatchLimits(), gone: StopCheck | None = None) -> Result:
    spec, info = job.spec, computed.extractor.info
    if index in computed.errors:
        return job_failure(spec.id, "output stage", computed.errors[index])
    if spec.deadline and time.time() > spec.deadline:
        return failure(spec.id, 504, DEADLINE_MESSAGE)
    timings = {
        "queue": round((computed.prepared.started - spec.enqueued_at) * 1000, 3),
        "inference": round(computed.inference_s * 1000, 3),
    }
    meta = ResultMeta(job_id=spec.id, model=info.name, model_version=info.version,
                      timings_ms=timings, cached=computed.cached)
    result = Result(meta)
    try:
        if spec.kind == "correspond":
            _matches(meta, spec, computed.features[spec.layers[0]][rows], limits, gone)
        else:
            output = computed.outputs[index]
            meta.layers, meta.layout = output.layers, layout(spec)
            result.body = output.buffer.numpy().data.cast("B")
    except DeadlinePassed:
        return failure(spec.id, 504, DEADLINE_MESSAGE)
    except Exception:
        return internal_error(spec.id, "post-processing")
    if gone is not None and gone():  # (its search may have stopped early: not an answer)
        return failure(spec.id, CLIENT_CLOSED, CANCELLED_MESSAGE)
    return result


def _matches(meta: ResultMeta, spec: JobSpec, feats: torch.Tensor, limits: MatchLimits,
             gone: StopCheck | None = None) -> None:
    """Source (row 0) against each target (rows 1...): the source was computed once. The
    targets share the job's candidate budget, in order."""
    points = [list(p) for p in spec.points] if spec.points is not None else None
    answers = []
    stats = Refinement()
    stop_at = spec.deadline - limits.answer_margin_s if spec.deadline else None
    for i, target_size in enumerate(spec.image_sizes[1:], start=1):
        left = None if limits.max_pixels is None else max(0, limits.max_pixels - stats.pixels)
        matches = correspond(feats[0], feats[i], spec.image_sizes[0], target_size, points,
                             max_matches=spec.max_matches, deadline=spec.deadline or None,
                             limits=Limits(stop_at=stop_at, max_pixels=left, stop=gone),
                             stats=stats)
        heatmap = None
        if spec.heatmap and points:
            sim = similarity_map(feats[0], feats[i], points[-1], spec.image_sizes[0])
            heatmap = Heatmap(width=sim.shape[1], height=sim.shape[0],
                              values=[round(v, 4) for v in sim.flatten().tolist()])
        answers.append(TargetMatches(matches=[m.to_json() for m in matches], heatmap=heatmap))
    if len(answers) == 1:
        meta.matches, meta.heatmap = answers[0].matches, answers[0].heatmap
    else:
        meta.targets = answers


def inexact_matches(meta: ResultMeta) -> int:
    """Matches of an answer whose search a limit stopped before it was proven."""
    lists = [meta.matches or []] + [t.matches for t in meta.targets or []]
    return sum(1 for matches in lists for m in matches if m.get("exact") is False)
