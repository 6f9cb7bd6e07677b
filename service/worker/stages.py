"""The three stages of running a batch: pre (CPU), core (forward), post (results).

They are separate functions so the worker can run them on separate threads and overlap
CPU work and host-device copies with the forward pass of the next batch.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from cleandift.contract import InvalidPointsError, RequestError
from cleandift.dtypes import torch_dtype
from cleandift.extractor import Extractor, StopCheck, Stopped
from cleandift.matching import DeadlinePassed, Limits, Refinement, correspond, similarity_map
from cleandift.reduce import SCALE_SUFFIX, at_points, pooled, quantize_int8

from .. import tracing
from ..messages import (
    CLIENT_CLOSED,
    Heatmap,
    Job,
    JobSpec,
    LayerMeta,
    Result,
    ResultMeta,
    TargetMatches,
    failure,
)
from .batching import Batch

log = logging.getLogger(__name__)
WIRE_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
               torch.int8: "int8"}
DEADLINE_MESSAGE = "the deadline passed before a worker finished the job"
CANCELLED_MESSAGE = "the client went away: the job was cancelled"
assert sys.byteorder == "little", "results carry the host's bytes: little-endian, as promised"


@dataclass
class Prepared:
    batch: Batch
    pixels: torch.Tensor
    started: float  # when the worker began this batch (end of queueing)
    marks: dict[str, tuple[float, float]] = field(default_factory=dict)  # stage: start, end
    version: str | None = None  # the fleet's live version when its jobs were claimed


@dataclass
class Output:
    """One features job's answer on the host: every layer's bytes, concatenated in the
    order of `layers`, in one buffer (pinned memory on CUDA)."""

    buffer: torch.Tensor  # uint8
    layers: dict[str, LayerMeta]


@dataclass
class Computed:
    prepared: Prepared
    features: dict[str, torch.Tensor]
    extractor: Extractor  # the exact model (version) that produced them
    inference_s: float = 0.0
    cached: bool = False  # read from the feature cache, not computed
    outputs: dict[int, Output] = field(default_factory=dict)  # by job index in the batch
    events: tuple[Any, Any] | None = None  # CUDA (forward start, copies done)
    errors: dict[int, Exception] = field(default_factory=dict)  # a job's output failed


def prepare(batch: Batch, pin: bool) -> Prepared:
    """The batch as one uint8 NHWC tensor (pinned for CUDA); `Extractor.features` turns it
    into model input on the device."""
    started = time.time()
    pixels = torch.from_numpy(np.stack(batch.images))
    if pin:
        pixels = pixels.pin_memory()
    return Prepared(batch=batch, pixels=pixels, started=started,
                    marks={"pre": (started, time.time())})


def forward(prepared: Prepared, extractor: Extractor, should_stop: StopCheck | None = None
            ) -> Computed:
    """On CUDA this only queues work: the forward pass, then the conversion to the output
    dtype on the GPU and asynchronous copies into pinned buffers. The forward thread goes
    on to the next batch at once; the post stage waits for the copies' event.
    `should_stop` (every job's deadline passed) ends a DIFT ensemble between passes."""
    batch = prepared.batch
    cuda = extractor.device.type == "cuda"
    start, wall = time.perf_counter(), time.time()
    begin = _event() if cuda else None
    feats = extractor.features(prepared.pixels, batch.layers, batch.prompt, mode=batch.mode,
                               seeds=batch.noise_seeds(), should_stop=should_stop)
    computed = Computed(prepared, feats, extractor)
    if cuda:
        computed.outputs = stage_outputs(computed)  # same stream: ordered after the forward
        computed.events = (begin, _event())
        prepared.marks["forward"] = (wall, wall)  # ends when its copies are done (finish)
    else:
        computed.inference_s = time.perf_counter() - start
        prepared.marks["forward"] = (wall, time.time())
    return computed


def from_cache(job: Job, maps: list[dict[str, torch.Tensor]], extractor: Extractor) -> Computed:
    """A job whose maps the cache held: it goes to the post stage without a forward."""
    started = time.time()
    features = {key: torch.stack([m[key] for m in maps]) for key in job.spec.layers}
    prepared = Prepared(Batch([job], list(job.spec.layers)), torch.empty(0), started)
    return Computed(prepared, features, extractor, cached=True)


def image_maps(computed: Computed, rows: slice) -> list[dict[str, torch.Tensor]]:
    """Every computed layer of each image of a job (what the cache keeps)."""
    return [{key: feats[row] for key, feats in computed.features.items()}
            for row in range(rows.start, rows.stop)]


def _event() -> Any:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def stage_outputs(computed: Computed) -> dict[int, Output]:
    """Each features job's tensors, reduced and converted on their device and copied into
    one host buffer per job: one copy per tensor, no Python bytes in between. A job whose
    output cannot be made is noted in `computed.errors` and fails alone."""
    batch, outputs = computed.prepared.batch, {}
    pin = next(iter(computed.features.values())).is_cuda  # cached maps live on the host
    for index, (job, rows) in enumerate(zip(batch.jobs, batch.rows())):
        if job.spec.kind != "features":
            continue
        try:
            outputs[index] = _output(job.spec, {k: computed.features[k][rows][0]
                                                for k in job.spec.layers}, pin)
        except Exception as exc:  # this job's parameters or bytes: its batch-mates go on
            computed.errors[index] = exc
    return outputs


def _output(spec: JobSpec, maps: dict[str, torch.Tensor], pin: bool) -> Output:
    tensors = answer_tensors(spec, maps)
    layers = {key: LayerMeta(shape=list(t.shape), dtype=WIRE_DTYPES[t.dtype])
              for key, t in tensors.items()}
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    buffer = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=pin)
    offset = 0
    for tensor, size in zip(tensors.values(), sizes):
        target = buffer[offset:offset + size].view(tensor.dtype).view(tensor.shape)
        target.copy_(tensor, non_blocking=pin)
        offset += size
    return Output(buffer, layers)


def answer_tensors(spec: JobSpec, maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a features job asked for, per layer, on the maps' device: the map, its
    descriptors at points or its pooled grid, in the output dtype (int8: with scales)."""
    out: dict[str, torch.Tensor] = {}
    if spec.points is not None and not spec.points:
        raise InvalidPointsError("points is empty: give at least one [x, y] pair")
    for key, feat in maps.items():
        if spec.points is not None:
            values, channel_axis = at_points(feat, spec.points, spec.image_sizes[0]), 1
        elif spec.grid is not None:
            values, channel_axis = pooled(feat, spec.grid), 0
        else:
            values, channel_axis = feat, 0
        if spec.dtype == "int8":
            out[key], out[key + SCALE_SUFFIX] = quantize_int8(values, channel_axis)
        else:
            out[key] = values.to(torch_dtype(spec.dtype))
    return out


def layout(spec: JobSpec) -> Literal["map", "points", "grid"]:
    return "points" if spec.points is not None else "grid" if spec.grid is not None else "map"


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
