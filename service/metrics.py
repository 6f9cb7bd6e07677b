"""Every Prometheus metric of the service, one prefix (`cleandift_`), one module.

One view per process kind, each correct by construction, so `sum()` over scrapes adds up:
- API: the counters and histograms of every uvicorn process of a replica. With several
  processes they live in prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR,
  set by `run_api` before the processes start), so whichever process answers a scrape
  answers with the sum of all of them. What describes the queue rather than a process
  (depth, pending jobs, live workers, the served model) is read from Redis at scrape time
  and never stored per process.
- Worker: each worker process serves its own registry on its own port. The API does not
  re-export it (every API replica would count each worker again); `/metrics/workers` on
  the API is a human view of the workers' heartbeats, not a scrape target.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "cleandift"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
JOB_BYTES_BUCKETS = (16e3, 64e3, 256e3, 1e6, 4e6, 16e6, 64e6)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


@dataclass
class QueueState:
    """The queue as Redis describes it at scrape time (None: Redis unreachable)."""

    depth: int | None = None
    pending: int | None = None
    workers_alive: int = 0
    model: tuple[str, str] | None = None  # (name, version)
    served: str = ""  # the `model` label: the served name (or the model's name)


class QueueStateCollector:
    """Gauges of each served model's queue, from the states read for this scrape."""

    def __init__(self, states: Callable[[], list[QueueState]]) -> None:
        self._states = states

    def collect(self) -> Iterator[Metric]:
        states = self._states()
        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Jobs in the stream",
                                  labels=["model"])
        pending = GaugeMetricFamily(f"{PREFIX}_queue_pending",
                                    "Jobs delivered to a worker, not yet acknowledged",
                                    labels=["model"])
        alive = GaugeMetricFamily(f"{PREFIX}_workers_alive", "Workers with a recent heartbeat",
                                  labels=["model"])
        info = GaugeMetricFamily(f"{PREFIX}_model_info", "Served model",
                                 labels=["model", "name", "version"])
        for state in states:
            if state.depth is not None:  # None: Redis unreachable, no stale figure
                depth.add_metric([state.served], state.depth)
            if state.pending is not None:
                pending.add_metric([state.served], state.pending)
            alive.add_metric([state.served], state.workers_alive)
            if state.model is not None:
                info.add_metric([state.served, *state.model], 1)
        yield from (family for family in (depth, pending) if family.samples)
        yield alive
        yield info


class ApiMetrics:
    """What an API process records; `render` answers for every process of the replica."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "HTTP requests by route, status and served model",
            ["route", "status", "model"], registry=r,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds", "HTTP request latency by route and model",
            ["route", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.layer_requests = Counter(
            f"{PREFIX}_layer_requests", "Feature maps asked for, by request kind and layer",
            ["kind", "layer"], registry=r,
        )
        self.job_bytes = Histogram(
            f"{PREFIX}_job_image_bytes", "Image bytes a job puts in the queue, by what "
            "travels: `uploads` (a worker decodes) or `pixels` (the API decoded)",
            ["images"], buckets=JOB_BYTES_BUCKETS, registry=r,
        )
        self.states: list[QueueState] = []
        directory = multiprocess_dir or os.environ.get(MULTIPROC_ENV)
        if directory:  # every process's files, summed at each scrape
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed, path=directory)
        else:
            self.exposed = self.registry
        self.exposed.register(QueueStateCollector(lambda: self.states))

    def count_layers(self, kind: str, layers: list[str]) -> None:
        for layer in layers:
            self.layer_requests.labels(kind=kind, layer=layer).inc()

    def count_job(self, uploads: bool, nbytes: int) -> None:
        self.job_bytes.labels(images="uploads" if uploads else "pixels").observe(nbytes)

    def render(self, states: QueueState | list[QueueState]) -> bytes:
        self.states = states if isinstance(states, list) else [states]
        return generate_latest(self.exposed)


GpuReader = Callable[[], dict[str, float]]


class GpuCollector:
    """GPU memory (and utilisation where the driver tells) of this worker's device."""

    NAMES = {
        "allocated": ("gpu_memory_allocated_bytes", "Memory held by tensors"),
        "reserved": ("gpu_memory_reserved_bytes", "Memory held by the caching allocator"),
        "total": ("gpu_memory_total_bytes", "The device's memory"),
        "utilization": ("gpu_utilization_ratio", "Busy fraction of the last sample period"),
    }

    def __init__(self, read: GpuReader, device: str) -> None:
        self._read, self._device = read, device

    def collect(self) -> Iterator[Metric]:
        for key, value in self._read().items():
            name, doc = self.NAMES[key]
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["device"])
            family.add_metric([self._device], value)
            yield family


# serve pins each GPU worker with CUDA_VISIBLE_DEVICES; this names the physical GPU in
# the worker's gauges and heartbeat (inside, the worker sees it as cuda:0).
GPU_LABEL_ENV = "CLEANDIFT_GPU_LABEL"


def device_label(device: object) -> str:
    """The device as people know it: the physical GPU of a pinned worker."""
    return os.environ.get(GPU_LABEL_ENV) or str(device)


def torch_gpu_reader(index: int) -> GpuReader:
    """Reads torch's allocator figures; utilisation only when NVML answers."""
    import torch

    def read() -> dict[str, float]:
        figures = {"allocated": float(torch.cuda.memory_allocated(index)),
                   "reserved": float(torch.cuda.memory_reserved(index)),
                   "total": float(torch.cuda.get_device_properties(index).total_memory)}
        with contextlib.suppress(Exception):  # no pynvml / NVML: memory only
            figures["utilization"] = torch.cuda.utilization(index) / 100.0
        return figures

    return read


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size_images", "Images per forward pass", buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            f"{PREFIX}_inference_duration_seconds", "Forward pass time per batch",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds", "Time from enqueue to a worker taking the job",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.images = Counter(f"{PREFIX}_images_processed", "Images through the model",
                              registry=r)
        self.jobs = Counter(f"{PREFIX}_jobs", "Jobs answered by kind and status",
                            ["kind", "status"], registry=r)
        self.retried = Counter(f"{PREFIX}_deliveries_retried", "Jobs reclaimed from a dead worker",
                               registry=r)
        self.dead = Counter(f"{PREFIX}_dead_lettered", "Jobs given up after max deliveries",
                            registry=r)
        self.inexact_matches = Counter(
            f"{PREFIX}_matches_inexact", "Correspondences answered before their search proved "
            "DIFT's argmax (a cost or time limit stopped it; the answer says exact: false)",
            registry=r)
        self.expired = Counter(f"{PREFIX}_jobs_expired", "Jobs answered 504: their deadline "
                               "passed before or during their work", registry=r)
        self.cancelled = Counter(f"{PREFIX}_jobs_cancelled", "Jobs dropped or stopped because "
                                 "their client went away", registry=r)
        self.reloads = Counter(f"{PREFIX}_reloads", "Model reloads by result", ["result"],
                               registry=r)
        self.cache_lookups = Counter(
            f"{PREFIX}_feature_cache_lookups", "Feature cache lookups by where the maps were "
            "found: memory, shared (Redis) or miss", ["result"], registry=r)
        self.cache_bytes = Gauge(f"{PREFIX}_feature_cache_memory_bytes",
                                 "Bytes in this worker's feature cache", registry=r)
        self.results_inline_full = Counter(
            f"{PREFIX}_results_store_full", "Large results sent through Redis because the "
            "worker's result store was full", registry=r)
        self.model_info = Gauge(f"{PREFIX}_worker_model_info", "Model a worker serves",
                                ["name", "version"], registry=r)

    def watch_gpu(self, read: GpuReader, device: str) -> None:
        self.registry.register(GpuCollector(read, device))

    def value(self, name: str, **labels: str) -> float:
        """One sample of this worker's registry by its exposed name (0 when absent)."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def set_model(self, name: str, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name=name, version=version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


Snapshot = str | tuple[str, dict[str, str]]  # the text, and labels for all its samples


def merge_worker_snapshots(snapshots: Mapping[str, Snapshot]) -> bytes:
    """The workers' heartbeat snapshots as one text, each sample labelled by worker (and
    by the model and device it serves, where given)."""
    registry = CollectorRegistry()
    registry.register(_Snapshots(snapshots))
    return generate_latest(registry)


class _Snapshots:
    def __init__(self, snapshots: Mapping[str, Snapshot]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for worker, snapshot in sorted(self._snapshots.items()):
            text, extra = snapshot if isinstance(snapshot, tuple) else (snapshot, {})
            for family in text_string_to_metric_families(text):
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(
                        family.name, family.documentation, family.type
                    )
                for s in family.samples:
                    out.add_sample(s.name, {**extra, **s.labels, "worker": worker}, s.value)
        yield from merged.values()
