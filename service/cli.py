"""`cleandift api | worker | serve`: flags override CLEANDIFT_* settings.

Each option shows its variable in --help; every other setting (docs/deploy.md) is a
variable only. The API key has no flag on purpose: a command line shows in `ps`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cleandift.cli import DeviceOpt, DtypeOpt, ModelOpt, UnetOpt, settings_with

if TYPE_CHECKING:
    from cleandift.settings import Settings

RedisOpt = Annotated[str | None, typer.Option(
    envvar=["CLEANDIFT_REDIS_URL", "REDIS_URL"], help="Redis URL; serve starts its own if unset")]
HostOpt = Annotated[str | None, typer.Option(envvar="CLEANDIFT_HOST",
                                             help="bind address (default 127.0.0.1)")]
PortOpt = Annotated[int | None, typer.Option(envvar="CLEANDIFT_PORT",
                                             help="HTTP port (default 8000)")]
BatchOpt = Annotated[int | None, typer.Option(envvar="CLEANDIFT_MAX_BATCH",
                                              help="images per forward pass at most")]
ThreadsOpt = Annotated[int | None, typer.Option(envvar="CLEANDIFT_TORCH_THREADS",
                                                help="CPU threads per worker (torch)")]
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


def api(redis_url: RedisOpt = None, host: HostOpt = None, port: PortOpt = None,
        processes: Annotated[int | None, typer.Option(
            envvar="CLEANDIFT_API_WORKERS", help="API processes (default 1)")] = None,
        ) -> None:
    from .processes.launch import run_api

    run_api(_with_redis("the API", redis_url=redis_url, host=host, port=port,
                        api_workers=processes))


api.__doc__ = "Run the HTTP API (FastAPI + uvicorn) in front of the Redis queue." + KEY_NOTE


def worker(
    model: ModelOpt = None,
    unet: UnetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    redis_url: RedisOpt = None,
    max_batch: BatchOpt = None,
    port: Annotated[int | None, typer.Option(
        envvar="CLEANDIFT_WORKER_PORT",
        help="the worker's own port (probes, metrics, results); 0: any free port")] = None,
    torch_threads: ThreadsOpt = None,
) -> None:
    """Run a worker: load the model, take batches from the queue, answer them."""
    from .processes.launch import run_worker

    run_worker(_with_redis("a worker", model=model, unet=unet, device=device, dtype=dtype,
                           redis_url=redis_url, max_batch=max_batch, worker_port=port,
                           torch_threads=torch_threads))


def serve(
    model: ModelOpt = None,
    unet: UnetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    redis_url: RedisOpt = None,
    redis_server: Annotated[Path | None, typer.Option(envvar="CLEANDIFT_REDIS_SERVER",
                                                      help="redis-server binary")] = None,
    host: HostOpt = None,
    port: PortOpt = None,
    max_batch: BatchOpt = None,
    workers: Annotated[int | None, typer.Option(envvar="CLEANDIFT_WORKERS",
                                                help="worker processes (default 1)")] = None,
    torch_threads: ThreadsOpt = None,
) -> None:
    from .processes.serve import run_serve

    run_serve(settings_with(model=model, unet=unet, device=device, dtype=dtype,
                            redis_url=redis_url, host=host, port=port, max_batch=max_batch,
                            workers=workers, torch_threads=torch_threads,
                            redis_server=str(redis_server) if redis_server else None))


serve.__doc__ = ("All in one: API + worker(s) (+ a private redis-server without REDIS_URL)."
                 + KEY_NOTE)


def register(app: typer.Typer) -> None:
    for command in (serve, api, worker):
        app.command()(command)
