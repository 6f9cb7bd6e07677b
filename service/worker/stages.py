"""The three stages of running a batch: pre (CPU), core (forward), post (results).

They are separate functions so the worker can run them on separate threads and overlap
CPU work and host-device copies with the forward pass of the next batch.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from cleandift.dtypes import torch_dtype
from cleandift.extractor import Extractor
from cleandift.images import to_pixels
from cleandift.matching import DeadlinePassed, correspond, similarity_map

from ..messages import Heatmap, Job, JobSpec, LayerMeta, Result, ResultMeta, failure
from .batching import Batch

log = logging.getLogger(__name__)
DEADLINE_MESSAGE = "the deadline passed before a worker finished the job"


@dataclass
class Prepared:
    batch: Batch
    pixels: torch.Tensor
    started: float  # when the worker began this batch (end of queueing)


@dataclass
class Computed:
    prepared: Prepared
    features: dict[str, torch.Tensor]
    extractor: Extractor  # the exact model (version) that produced them
    inference_s: float


def prepare(batch: Batch, pin: bool) -> Prepared:
    started = time.time()
    pixels = to_pixels(batch.images)
    if pin:
        pixels = pixels.pin_memory()
    return Prepared(batch=batch, pixels=pixels, started=started)


def forward(prepared: Prepared, extractor: Extractor) -> Computed:
    batch = prepared.batch
    start = time.perf_counter()
    feats = extractor.features(prepared.pixels, batch.layers, batch.prompt, mode=batch.mode)
    if extractor.device.type == "cuda":
        torch.cuda.synchronize(extractor.device)
    return Computed(prepared, feats, extractor, time.perf_counter() - start)


def results(computed: Computed) -> list[tuple[Job, Result]]:
    """Per-job results: raw feature bytes, or matches computed next to the features.
    One job's failure answers that job only; its batch-mates are answered normally."""
    batch = computed.prepared.batch
    return [(job, job_result(job, rows, computed)) for job, rows in zip(batch.jobs, batch.rows())]


def job_result(job: Job, rows: slice, computed: Computed) -> Result:
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
            _features(result, spec, computed.features, rows)
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


def _features(result: Result, spec: JobSpec, features: dict[str, torch.Tensor],
              rows: slice) -> None:
    out_dtype = torch_dtype(spec.dtype)
    for key in spec.layers:
        tensor = features[key][rows][0].to(out_dtype).cpu().contiguous()
        result.meta.layers[key] = LayerMeta(shape=list(tensor.shape), dtype=spec.dtype)
        result.data[key] = little_endian_bytes(tensor.numpy())


def internal_error(job_id: str, stage: str) -> Result:
    """A 500 whose text names the stage and an id to find the traceback in the worker's
    log; the exception's own text (paths, addresses) never reaches the client."""
    error_id = uuid.uuid4().hex[:12]
    log.exception("%s failed for job %s (error id %s)", stage, job_id, error_id)
    return failure(job_id, 500, f"the worker's {stage} failed (error id {error_id}; the "
                                "worker log has the details)")


def little_endian_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def failed(jobs: list[Job], status: int, message: str) -> list[tuple[Job, Result]]:
    return [(job, failure(job.spec.id, status, message)) for job in jobs]
