"""`cleandift api | worker | serve`: flags override CLEANDIFT_* settings.

Each option shows its variable in --help; every other setting (docs/deploy.md) is a
variable only. The API key has no flag on purpose: a command line shows in `ps`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cleandift.cli_options import DeviceOpt, DtypeOpt, ModelOpt, UnetOpt, settings_with

if TYPE_CHECKING:
    from cleandift.settings import Settings

RedisOpt = Annotated[str | None, typer.Option(
    envvar=["CLEANDIFT_REDIS_URL", "REDIS_URL"],
    help="Redis URL (serve starts a private one when unset; api and worker need one)")]
HostOpt = Annotated[str | None, typer.Option(envvar="CLEANDIFT_HOST",
                                             help="bind address (default 127.0.0.1)")]
PortOpt = Annotated[int | None, typer.Option(envvar="CLEANDIFT_PORT",
                                             help="HTTP port (default 8000)")]
BatchOpt = Annotated[int | None, typer.Option(envvar="CLEANDIFT_MAX_BATCH",
                                              help="images per forward pass at most")]
ThreadsOpt = Annotated[int | None, typer.Option(envvar="CLEANDIFT_TORCH_THREADS",
                                                help="CPU threads per worker (torch)")]
ModelsOpt = Annotated[list[str] | None, typer.Option(
    "--model", "-m", help="SPEC (diffusers folder, hub id, registry DIR/NAME, demo, demo15), "
    "or NAME=SPEC, repeated, to serve several models by name [env: CLEANDIFT_MODEL, "
    "CLEANDIFT_MODELS]")]
FleetOpt = Annotated[Path | None, typer.Option(
    "--fleet", envvar="CLEANDIFT_FLEET_FILE", help="TOML file of the served models, with "
    "per-model dtype, devices, workers and batch limits (docs/fleet.md)")]
DefaultModelOpt = Annotated[str | None, typer.Option(
    envvar="CLEANDIFT_DEFAULT_MODEL", help="the model of requests that name none (default: "
    "the first)")]
WorkerPortOpt = Annotated[int | None, typer.Option(
    "--worker-port", envvar="CLEANDIFT_WORKER_PORT", help="a worker's own port (probes, "
    "metrics, results; serve: the first, +1 each; 0: any free port; default 9001)")]
ApiWorkersOpt = Annotated[int | None, typer.Option(
    "--api-workers", "--processes", envvar="CLEANDIFT_API_WORKERS",
    help="API processes sharing the port (default 1)")]
MaxQueueOpt = Annotated[int | None, typer.Option(
    envvar="CLEANDIFT_MAX_QUEUE", help="jobs waiting or running before 429 (default 256)")]
LogLevelOpt = Annotated[str | None, typer.Option(
    envvar="CLEANDIFT_LOG_LEVEL", help="DEBUG, INFO (default), WARNING or ERROR")]
LogFormatOpt = Annotated[str | None, typer.Option(
    envvar="CLEANDIFT_LOG_FORMAT", help="text (default) or json (one object per line)")]
TracingOpt = Annotated[str | None, typer.Option(
    envvar="CLEANDIFT_TRACING", help="off (default), otlp (OTEL_* variables) or console")]
ClusterOpt = Annotated[bool | None, typer.Option(
    "--redis-cluster/--no-redis-cluster", envvar="CLEANDIFT_REDIS_CLUSTER",
    help="the Redis URL names a node of a Redis Cluster (docs/scale.md)")]
PartitionsOpt = Annotated[int | None, typer.Option(
    envvar="CLEANDIFT_QUEUE_PARTITIONS", help="streams per model's queue, spread over the "
    "cluster's nodes (default 1; the API and every worker must agree)")]
KEY_NOTE = " Clients must send CLEANDIFT_API_KEY when it is set (environment only)."
NO_REDIS = ("error: {what} needs a Redis URL: give --redis-url, or set CLEANDIFT_REDIS_URL "
            "or REDIS_URL (`cleandift serve` starts its own Redis)")


def _with_redis(what: str, **overrides: Any) -> Settings:
    """The settings, or one line and exit code 2 when no Redis URL is known: api and
    worker only ever talk to a Redis someone else runs."""
    settings = settings_with(**overrides)
    if not settings.redis_url:
        typer.echo(NO_REDIS.format(what=what), err=True)
        raise typer.Exit(2)
    return settings


def model_flags(values: list[str] | None) -> dict[str, Any]:
    """--model SPEC (one unnamed model) or --model NAME=SPEC ... (several, by name)."""
    if not values:
        return {}
    if len(values) == 1 and "=" not in values[0]:
        return {"model": values[0]}
    return {"models": values}


def api(redis_url: RedisOpt = None, host: HostOpt = None, port: PortOpt = None,
        api_workers: ApiWorkersOpt = None,
        model: Annotated[list[str] | None, typer.Option(
            "--model", "-m", help="a served model's NAME (or NAME=SPEC), repeated, when the "
            "deployment serves several [env: CLEANDIFT_MODELS]")] = None,
        fleet: FleetOpt = None, default_model: DefaultModelOpt = None,
        max_queue: MaxQueueOpt = None, log_level: LogLevelOpt = None,
        log_format: LogFormatOpt = None, tracing: TracingOpt = None,
        redis_cluster: ClusterOpt = None, queue_partitions: PartitionsOpt = None,
        ) -> None:
    from .fleet import FleetError, fleet_of
    from .processes.launch_api import run_api

    names = {"models": model} if model else {}
    settings = _with_redis("the API", redis_url=redis_url, host=host, port=port,
                           api_workers=api_workers, fleet_file=fleet,
                           default_model=default_model, max_queue=max_queue,
                           log_level=log_level, log_format=log_format, tracing=tracing,
                           redis_cluster=redis_cluster, queue_partitions=queue_partitions,
                           **names)
    try:
        fleet_of(settings)
    except FleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    run_api(settings)


api.__doc__ = "Run the HTTP API (FastAPI + uvicorn) in front of the Redis queue." + KEY_NOTE


def worker(
    model: ModelOpt = None,
    unet: UnetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    redis_url: RedisOpt = None,
    max_batch: BatchOpt = None,
    host: HostOpt = None,
    worker_port: Annotated[int | None, typer.Option(
        "--worker-port", envvar="CLEANDIFT_WORKER_PORT",
        help="the worker's own port (probes, metrics, results); 0: any free port; default "
        "9001")] = None,
    torch_threads: ThreadsOpt = None,
    model_name: Annotated[str | None, typer.Option(
        envvar="CLEANDIFT_MODEL_NAME", help="the name its model is served under, when the "
        "deployment serves several (its queue is then PREFIX.NAME)")] = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
    tracing: TracingOpt = None,
    redis_cluster: ClusterOpt = None,
    queue_partitions: PartitionsOpt = None,
) -> None:
    """Run a worker: load the model, take batches from the queue, answer them."""
    from .processes.launch_worker import redis_problem, run_worker

    settings = _with_redis("a worker", model=model, unet=unet, device=device, dtype=dtype,
                           redis_url=redis_url, max_batch=max_batch, host=host,
                           worker_port=worker_port, torch_threads=torch_threads,
                           model_name=model_name,
                           log_level=log_level, log_format=log_format, tracing=tracing,
                           redis_cluster=redis_cluster, queue_partitions=queue_partitions)
    problem = redis_problem(settings)
    if problem:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(1)
    run_worker(settings)


def serve(
    model: ModelsOpt = None,
    unet: UnetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    redis_url: RedisOpt = None,
    redis_server: Annotated[Path | None, typer.Option(envvar="CLEANDIFT_REDIS_SERVER",
                                                      help="redis-server binary")] = None,
    host: HostOpt = None,
    port: PortOpt = None,
    max_batch: BatchOpt = None,
    workers: Annotated[int | None, typer.Option(
        envvar="CLEANDIFT_WORKERS", help="worker processes per model (default: 1 on CPU, "
        "one per GPU)")] = None,
    torch_threads: ThreadsOpt = None,
    devices: Annotated[str | None, typer.Option(
        envvar="CLEANDIFT_DEVICES", help="all (every visible GPU), 0,1,3, or cpu")] = None,
    fleet: FleetOpt = None,
    default_model: DefaultModelOpt = None,
    worker_port: WorkerPortOpt = None,
    api_workers: ApiWorkersOpt = None,
    max_queue: MaxQueueOpt = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
    tracing: TracingOpt = None,
    redis_cluster: ClusterOpt = None,
    queue_partitions: PartitionsOpt = None,
) -> None:
    from .fleet import FleetError
    from .processes.serve import run_serve

    if redis_cluster and not redis_url:
        typer.echo("error: --redis-cluster needs --redis-url (a node of your cluster): "
                   "serve starts a single Redis of its own otherwise", err=True)
        raise typer.Exit(2)
    try:
        run_serve(settings_with(unet=unet, device=device, dtype=dtype, redis_url=redis_url,
                                host=host, port=port, max_batch=max_batch, workers=workers,
                                torch_threads=torch_threads, devices=devices,
                                fleet_file=fleet, default_model=default_model,
                                redis_server=str(redis_server) if redis_server else None,
                                worker_port=worker_port, api_workers=api_workers,
                                max_queue=max_queue, log_level=log_level,
                                log_format=log_format, tracing=tracing,
                                redis_cluster=redis_cluster,
                                queue_partitions=queue_partitions, **model_flags(model)))
    except FleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


serve.__doc__ = ("All in one: API + worker(s) (+ a private redis-server without REDIS_URL)."
                 + KEY_NOTE)


def register(app: typer.Typer) -> None:
    for command in (serve, api, worker):
        app.command()(command)
