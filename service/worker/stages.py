"""The three stages of running a batch: pre (CPU), core (forward), post (results).

They are separate functions so the worker can run them on separate threads and overlap
CPU work and host-device copies with the forward pass of the next batch.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cleandift.dtypes import torch_dtype
from cleandift.extractor import Extractor
from cleandift.matching import DeadlinePassed, correspond, similarity_map

from ..messages import Heatmap, Job, JobSpec, LayerMeta, Result, ResultMeta, failure
from .batching import Batch

log = logging.getLogger(__name__)
DEADLINE_MESSAGE = "the deadline passed before a worker finished the job"
assert sys.byteorder == "little", "results carry the host's bytes: little-endian, as promised"


@dataclass
class Prepared:
    batch: Batch
    pixels: torch.Tensor
    started: float  # when the worker began this batch (end of queueing)


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
    outputs: dict[int, Output] = field(default_factory=dict)  # by job index in the batch
    events: tuple[Any, Any] | None = None  # CUDA (forward start, copies done)


def prepare(batch: Batch, pin: bool) -> Prepared:
    """The batch as one uint8 NHWC tensor (pinned for CUDA); `Extractor.features` turns it
    into model input on the device."""
    started = time.time()
    pixels = torch.from_numpy(np.stack(batch.images))
    if pin:
        pixels = pixels.pin_memory()
    return Prepared(batch=batch, pixels=pixels, started=started)


def forward(prepared: Prepared, extractor: Extractor) -> Computed:
    """On CUDA this only queues work: the forward pass, then the conversion to the output
    dtype on the GPU and asynchronous copies into pinned buffers. The forward thread goes
    on to the next batch at once; the post stage waits for the copies' event."""
    batch = prepared.batch
    cuda = extractor.device.type == "cuda"
    start = time.perf_counter()
    begin = _event() if cuda else None
    feats = extractor.features(prepared.pixels, batch.layers, batch.prompt, mode=batch.mode)
    computed = Computed(prepared, feats, extractor)
    if cuda:
        computed.outputs = stage_outputs(computed)  # same stream: ordered after the forward
        computed.events = (begin, _event())
    else:
        computed.inference_s = time.perf_counter() - start
    return computed


def _event() -> Any:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def stage_outputs(computed: Computed) -> dict[int, Output]:
    """Each features job's layers, converted on their device and copied into one host
    buffer per job: one copy per layer, no Python bytes in between."""
    batch, outputs = computed.prepared.batch, {}
    pin = computed.extractor.device.type == "cuda"
    for index, (job, rows) in enumerate(zip(batch.jobs, batch.rows())):
        if job.spec.kind != "features":
            continue
        out_dtype = torch_dtype(job.spec.dtype)
        maps = {key: computed.features[key][rows][0] for key in job.spec.layers}
        layers = {key: LayerMeta(shape=list(m.shape), dtype=job.spec.dtype)
                  for key, m in maps.items()}
        sizes = [m.numel() * out_dtype.itemsize for m in maps.values()]
        buffer = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=pin)
        offset = 0
        for tensor, size in zip(maps.values(), sizes):
            target = buffer[offset:offset + size].view(out_dtype).view(tensor.shape)
            target.copy_(tensor.to(out_dtype), non_blocking=pin)
            offset += size
        outputs[index] = Output(buffer, layers)
    return outputs


def finish(computed: Computed) -> None:
    """In the post stage: wait for the GPU's copies (CUDA), or make the copies (CPU)."""
    if computed.events is not None:
        begin, done = computed.events
        done.synchronize()
        computed.inference_s = begin.elapsed_time(done) / 1000
    else:
        computed.outputs = stage_outputs(computed)


def results(computed: Computed) -> list[tuple[Job, Result]]:
    """Per-job results: raw feature bytes, or matches computed next to the features.
    One job's failure answers that job only; its batch-mates are answered normally."""
    finish(computed)
    batch = computed.prepared.batch
    return [(job, job_result(job, index, rows, computed))
            for index, (job, rows) in enumerate(zip(batch.jobs, batch.rows()))]


def job_result(job: Job, index: int, rows: slice, computed: Computed) -> Result:
    spec, info = job.spec, computed.extractor.info
    if spec.deadline and time.time() > spec.deadline:
        return failure(spec.id, 504, DEADLINE_MESSAGE)
    timings = {
        "queue": round((computed.prepared.started - spec.enqueued_at) * 1000, 3),
        "inference": round(computed.inference_s * 1000, 3),
    }
    meta = ResultMeta(job_id=spec.id, model=info.name, model_version=info.version,
                      timings_ms=timings)
    result = Result(meta)
    try:
        if spec.kind == "correspond":
            _matches(meta, spec, computed.features[spec.layers[0]][rows])
        else:
            output = computed.outputs[index]
            meta.layers = output.layers
            result.body = output.buffer.numpy().data.cast("B")
    except DeadlinePassed:
        return failure(spec.id, 504, DEADLINE_MESSAGE)
    except Exception:
        return internal_error(spec.id, "post-processing")
    return result


def _matches(meta: ResultMeta, spec: JobSpec, feats: torch.Tensor) -> None:
    points = [list(p) for p in spec.points] if spec.points is not None else None
    src_size, tgt_size = spec.image_sizes[0], spec.image_sizes[1]
    matches = correspond(feats[0], feats[1], src_size, tgt_size, points,
                         max_matches=spec.max_matches, deadline=spec.deadline or None)
    meta.matches = [m.to_json() for m in matches]
    if spec.heatmap and points:
        sim = similarity_map(feats[0], feats[1], points[-1], src_size)
        meta.heatmap = Heatmap(width=sim.shape[1], height=sim.shape[0],
                               values=[round(v, 4) for v in sim.flatten().tolist()])


def internal_error(job_id: str, stage: str) -> Result:
    """A 500 whose text names the stage and an id to find the traceback in the worker's
    log; the exception's own text (paths, addresses) never reaches the client."""
    error_id = uuid.uuid4().hex[:12]
    log.exception("%s failed for job %s (error id %s)", stage, job_id, error_id)
    return failure(job_id, 500, f"the worker's {stage} failed (error id {error_id}; the "
                                "worker log has the details)")


def failed(jobs: list[Job], status: int, message: str) -> list[tuple[Job, Result]]:
    return [(job, failure(job.spec.id, status, message)) for job in jobs]
