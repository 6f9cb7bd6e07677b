"""The first two stages of running a batch: pre (CPU: one pinned tensor) and core (the
forward pass, and on CUDA the answers' conversion and copies queued behind it); post.py
is the third. They are separate functions so the worker can run them on separate threads
and overlap CPU work and host-device copies with the forward pass of the next batch.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from cleandift.contract import InvalidPointsError
from cleandift.dtypes import output_name, torch_dtype
from cleandift.extractor import Extractor, StopCheck
from cleandift.reduce import SCALE_SUFFIX, at_points, pooled, quantize_int8

from ..messages import (
    Job,
    JobSpec,
    LayerMeta,
)
from .batching import Batch

log = logging.getLogger(__name__)
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
    layers = {key: LayerMeta(shape=list(t.shape), dtype=output_name(t.dtype))
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
