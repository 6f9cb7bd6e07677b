"""Every Prometheus metric of the service, one prefix (`cleandift_`), one module.

Workers keep their own registry (served on their own port) and also ship its text in
their heartbeat, so the API's /metrics shows the whole system, labelled by worker.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "cleandift"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "HTTP requests by route and status", ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_seconds", "HTTP request latency", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Jobs in the stream", registry=r)
        self.queue_pending = Gauge(
            f"{PREFIX}_queue_pending", "Jobs delivered to a worker, not yet acknowledged",
            registry=r,
        )
        self.workers_alive = Gauge(f"{PREFIX}_workers_alive", "Workers with a recent heartbeat",
                                   registry=r)
        self.model_info = Gauge(f"{PREFIX}_model_info", "Served model", ["name", "version"],
                                registry=r)
        self.worker_snapshots: dict[str, str] = {}
        r.register(WorkerMetricsCollector(lambda: self.worker_snapshots))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            f"{PREFIX}_inference_seconds", "Forward pass time per batch",
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
        self.expired = Counter(f"{PREFIX}_jobs_expired", "Jobs dropped past their deadline",
                               registry=r)
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

    def value(self, name: str, **labels: str) -> float:
        """One sample of this worker's registry by its exposed name (0 when absent)."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def set_model(self, name: str, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name=name, version=version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class WorkerMetricsCollector:
    """Re-exposes the workers' heartbeat snapshots with a `worker` label."""

    def __init__(self, snapshots: Callable[[], dict[str, str]]) -> None:
        self._snapshots = snapshots

    def collect(self):
        merged: dict[str, Metric] = {}
        for worker, text in sorted(self._snapshots().items()):
            for family in text_string_to_metric_families(text):
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(
                        family.name, family.documentation, family.type
                    )
                for s in family.samples:
                    out.add_sample(s.name, {**s.labels, "worker": worker}, s.value)
        yield from merged.values()
