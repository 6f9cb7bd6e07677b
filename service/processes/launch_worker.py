"""The worker process: its parts assembled (queue, model holder, cache, reload watcher,
fleet switch) from the settings, then served until SIGTERM."""

from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from cleandift.settings import Settings

from ..metrics import device_label
from ..observability import configure_process

if TYPE_CHECKING:
    import redis

    from cleandift.extractor import Extractor

    from ..featurecache import FeatureCache
    from ..metrics import WorkerMetrics
    from ..queue.keys import Keys
    from ..worker.holder import ModelHolder
    from ..worker.loop import Worker
    from ..worker.reload import RegistryWatcher

log = logging.getLogger(__name__)


def build_worker(settings: Settings, extractor: Extractor | None = None) -> Worker:
    """Wire a Worker (without running it), loading the model unless one is given."""
    import torch

    from cleandift.loading import load_extractor

    from ..metrics import WorkerMetrics
    from ..queue.connect import queue_keys, sync_client
    from ..queue.partitions import make_consumer
    from ..worker.holder import ModelHolder
    from ..worker.loop import Worker

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    assert settings.redis_url, "the worker needs a Redis URL"
    client = sync_client(settings.redis_url, cluster=settings.redis_cluster)
    keys = queue_keys(settings, settings.model_name)
    if extractor is None:  # the version its fleet serves, where that is known
        args = {**settings.extractor_args(), "spec": live_spec(settings, client, keys)}
        extractor = load_extractor(**args)  # type: ignore[arg-type]
    extractor = served_as(extractor, settings.model_name)
    prepare_model(extractor, settings)
    log.info("loaded %s %s on %s", extractor.info.name, extractor.info.version, extractor.device)
    consumer = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    jobs = make_consumer(settings, client, settings.model_name, consumer)
    holder, metrics = ModelHolder(extractor), WorkerMetrics()
    if extractor.device.type == "cuda":
        from ..metrics import torch_gpu_reader

        index = extractor.device.index or 0
        metrics.watch_gpu(torch_gpu_reader(index), device_label(extractor.device))
    return Worker(settings, holder, jobs, metrics,
                  watcher(settings, holder, metrics, client, consumer),
                  feature_cache(settings, client))


def served_as(extractor: Extractor, name: str | None) -> Extractor:
    """Answers, /v1/models and the cache name a model by its served name, when it has one
    (the name clients choose it by); `base` and `version` still say what it is. A shallow
    copy: the modules are shared, the caller's extractor keeps its own name."""
    if not name or extractor.info.name == name:
        return extractor
    named = copy.copy(extractor)
    named.info = extractor.info.model_copy(update={"name": name})
    return named


def live_spec(settings: Settings, client: redis.Redis, keys: Keys) -> str | None:
    """A registry model's workers join at the version their fleet serves (a worker that
    restarts mid-rollout must not answer with another one); others load their spec."""
    from ..worker.reload import watched_model_dir
    from ..worker.switch import live_version

    model_dir = watched_model_dir(settings.model)
    if model_dir is None or settings.unet is not None:
        return settings.model
    version = live_version(client, keys)
    if version is not None and (model_dir / version).is_dir():
        return str(model_dir / version)
    return settings.model


def feature_cache(settings: Settings, client: redis.Redis) -> FeatureCache | None:
    from ..featurecache import FeatureCache, MemoryTier, SharedTier, eviction_risk
    from ..queue.connect import queue_keys

    memory = MemoryTier(settings.feature_cache_bytes) if settings.feature_cache_bytes else None
    shared = None
    if settings.feature_cache_shared_bytes:
        risk = eviction_risk(client)
        if risk:
            log.warning("shared feature cache off: %s (use noeviction)", risk)
        else:
            shared = SharedTier(client, queue_keys(settings, settings.model_name),
                                settings.feature_cache_shared_bytes)
    return FeatureCache(memory, shared) if memory is not None or shared is not None else None


def prepare_model(extractor: Extractor, settings: Settings) -> None:
    """Before a model serves (at start-up or after a reload): compile it if asked, and
    check it produces finite features."""
    from ..worker.holder import smoke_test

    if settings.compile:
        from cleandift.optimize import compile_extractor

        compile_extractor(extractor, settings.cache_dir, settings.compile_backend)
    smoke_test(extractor)  # a model that cannot produce finite features never serves


def watcher(settings: Settings, holder: ModelHolder, metrics: WorkerMetrics,
            client: redis.Redis, worker_id: str) -> RegistryWatcher | None:
    """A registry watcher when the worker serves DIR/NAME (following LATEST)."""
    from cleandift.loading import load_extractor

    from ..queue.connect import queue_keys
    from ..worker.reload import RegistryWatcher, watched_model_dir
    from ..worker.switch import FleetSwitch

    model_dir = watched_model_dir(settings.model)
    if model_dir is None or settings.unet is not None:
        return None
    device, dtype = holder.current.device, holder.current.dtype  # not the model: it must die

    def load(version_dir: Path) -> Extractor:
        extractor = load_extractor(version_dir, device=device, dtype=dtype,
                                   cache_dir=settings.cache_dir, demo_seed=settings.demo_seed)
        extractor = served_as(extractor, settings.model_name)
        prepare_model(extractor, settings)
        return extractor

    keys = queue_keys(settings, settings.model_name)
    switch = FleetSwitch(client, keys, worker_id, settings.worker_ttl_s,  # as it heartbeats
                         settings.switch_timeout_s)
    return RegistryWatcher(model_dir, holder, load, metrics, poll_s=settings.reload_poll_s,
                           client=client, channel=keys.registry_channel, switch=switch)


def run_worker(settings: Settings, extractor: Extractor | None = None) -> None:
    """A worker process: load the model (unless given one), serve until SIGTERM."""
    if not settings.redis_url:
        raise SystemExit("the worker needs a Redis URL (CLEANDIFT_REDIS_URL or REDIS_URL)")
    configure_process(settings, "cleandift-worker")
    worker = build_worker(settings, extractor)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    worker.run()


def redis_problem(settings: Settings) -> str | None:
    """What is wrong when the queue cannot be reached at all, said before the model loads
    (later outages are ridden out: the worker retries)."""
    from ..queue.connect import REDIS_ERRORS, sync_client

    assert settings.redis_url
    try:
        sync_client(settings.redis_url, socket_timeout=5.0, cluster=settings.redis_cluster
                    ).ping()
    except REDIS_ERRORS as exc:
        return f"cannot reach Redis at {settings.redis_url}: {exc}"
    return None
