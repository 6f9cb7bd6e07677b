"""`cleandift serve`: the API in this process, supervised workers and (without a
REDIS_URL) a supervised private redis-server, all stopped together."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import redis

from cleandift.settings import Settings

from ..fleet import FleetError, fleet_of
from ..metrics import GPU_LABEL_ENV
from ..queue.connect import REDIS_ERRORS, queue_keys, sync_client
from ..queue.consumer import remove_worker
from .launch_api import run_api, settings_env
from .placement import WorkerPlan, place
from .redis_server import RedisServer, die_with_parent, start_redis_server
from .supervisor import Child, Supervisor

log = logging.getLogger(__name__)


class PrivateRedis:
    """serve's own redis-server: no persistence; restarted empty on the same port."""

    def __init__(self, binary: str | None) -> None:
        self.binary = binary
        self.server: RedisServer = start_redis_server(binary)
        self._first = True

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> subprocess.Popen[bytes]:
        if not self._first:
            self.server.stop()
            self.server = start_redis_server(self.binary, port=self.server.port)
        self._first = False
        assert self.server.process is not None  # started above
        return self.server.process

    def stop(self) -> None:
        self.server.stop()


def physical_gpu(index: int) -> str:
    """The GPU that `serve`'s own index `index` is: where serve itself runs with
    CUDA_VISIBLE_DEVICES set (Slurm, a shared box), torch numbers only those GPUs, and a
    child must be given the parent's entry (an index, a UUID or a MIG id), not `index`."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not parent:
        return str(index)
    return [entry.strip() for entry in parent.split(",") if entry.strip()][index]


def worker_child(settings: Settings, plan: WorkerPlan, client: redis.Redis) -> Child:
    """A worker of `plan`: a fixed name (so a restart takes over its jobs), its own port,
    its model's settings and, on a GPU, only its GPU visible."""
    worker_id = f"{socket.gethostname()}-{os.getpid()}-w{plan.index}"
    port = settings.worker_port + plan.index if settings.worker_port else 0
    own = plan.model.settings(settings)
    update: dict[str, object] = {"worker_id": worker_id, "worker_port": port}
    if plan.gpu is not None:
        update["device"] = "cuda"  # cuda:0 of the one GPU it sees
    env = settings_env(own.model_copy(update=update))
    if plan.gpu is not None:
        gpu = physical_gpu(plan.gpu)
        env["CUDA_VISIBLE_DEVICES"] = gpu
        env[GPU_LABEL_ENV] = f"cuda:{gpu}"
    keys = queue_keys(settings, plan.model.name)

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "cleandift.cli", "worker"], env=env,
                                preexec_fn=die_with_parent)

    def heartbeat_age() -> float | None:
        try:
            score = client.zscore(keys.workers, worker_id)
        except REDIS_ERRORS:
            return None
        return None if score is None else time.time() - float(score)

    where = env.get(GPU_LABEL_ENV, plan.device_label)
    name = f"worker {worker_id} ({plan.model.name or 'model'} on {where})"
    return Child(name, start, on_exit=lambda: remove_worker(client, keys, worker_id),
                 heartbeat_age=heartbeat_age)


def worker_device(settings: Settings) -> str:
    """The device kind serve's workers will load on, as cleandift.loading picks it."""
    if settings.device:
        return settings.device.split(":")[0]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_plans(settings: Settings, gpus: int | None = None) -> list[WorkerPlan]:
    """serve's workers: the fleet placed on the usable devices. A device set for all
    models (--device cpu) keeps them on it; a GPU count of 0 means CPU workers."""
    visible = visible_gpus() if gpus is None else gpus
    explicit = settings.workers if "workers" in settings.model_fields_set else None
    fleet = fleet_of(settings)
    unspecified = [m.name for m in fleet.models if m.name is not None and m.spec is None]
    if unspecified and len(fleet.models) > 1:  # (an API needs names only; serve loads them)
        raise FleetError(f"model {unspecified[0]!r} has no spec: serve loads every model, "
                         f"so declare it as NAME=SPEC (or give it `spec` in the fleet file)")
    return place(fleet, settings.devices, visible, settings.workers,
                 device=settings.device, gpu_workers=explicit)


def _exit(*_args: object) -> None:
    raise SystemExit(0)


def run_serve(settings: Settings) -> None:
    from ..logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)  # serve's own lines too
    plans = worker_plans(settings)  # a fleet that cannot be placed fails before anything runs
    private = None
    children: list[Child] = []
    if not settings.redis_url:
        private = PrivateRedis(settings.redis_server)
        settings = settings.model_copy(update={"redis_url": private.url})
        children.append(Child("redis-server", private.start, tier=0))
        log.info("started a private redis-server at %s", private.url)
    on_gpu = any(plan.gpu is not None for plan in plans)
    settings = settings.job_cost_for("cuda" if on_gpu else worker_device(settings))
    assert settings.redis_url
    client = sync_client(settings.redis_url, socket_timeout=2.0, cluster=settings.redis_cluster)
    children += [worker_child(settings, plan, client) for plan in plans]
    supervisor = Supervisor(children, hung_after_s=settings.worker_ttl_s)
    supervisor.start()
    # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into SystemExit so
    # the workers and Redis are stopped too.
    signal.signal(signal.SIGTERM, _exit)
    stop: Callable[[], None] = supervisor.stop
    try:
        log.info("open http://%s:%d/ (the worker is loading the model)", settings.host,
                 settings.port)
        run_api(settings)
    finally:
        stop()
        if private is not None:
            private.stop()
