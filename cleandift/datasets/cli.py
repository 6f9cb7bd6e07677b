"""`cleandift extract-dataset`: features of a whole dataset, on one of three engines: a model
loaded here (`local`), a running service (`--service`), or Ray (`--engine ray`).

Kept beside cli.py (which registers it) so that module stays small.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Annotated, Any, Literal

import typer

from ..cli_options import (
    DeviceOpt,
    DtypeOpt,
    PromptOpt,
    SizeOpt,
    UnetOpt,
    _client_api_key,
    _given_size,
    _input_size,
    _layer_keys,
    _load,
    settings_with,
    user_errors,
)
from ..dtypes import OutputName


def extract_dataset(
    source: Annotated[str, typer.Argument(metavar="SOURCE",
        help="image folder, list file (paths or URLs, one per line) or shards 'd/{0..9}.tar'; "
        "local or an fsspec URL (s3://, gs://, file://)")],
    out: Annotated[str, typer.Option(help="output folder or fsspec URL (resumed when it "
                                     "exists)")],
    layers: Annotated[str | None, typer.Option(help="comma-separated keys; the model's "
                                               "default layers")] = None,
    size: SizeOpt = None,
    out_dtype: Annotated[OutputName, typer.Option(
        "--out-dtype", help="float16, bfloat16, float32, or int8 (per-channel scales)")]
    = "float16",
    grid: Annotated[int | None, typer.Option(help="pool each map to GRID x GRID")] = None,
    mode: Annotated[Literal["clean", "dift"], typer.Option(help="clean or dift")] = "clean",
    prompt: PromptOpt = "",
    shard_size: Annotated[int, typer.Option(help="images per shard file")] = 256,
    batch_size: Annotated[int, typer.Option(help="images per forward pass (local, ray)")] = 8,
    service: Annotated[str | None, typer.Option(
        help="a running service's URL: it computes, this command writes")] = None,
    concurrency: Annotated[int, typer.Option(help="requests in flight (--service)")] = 16,
    engine: Annotated[Literal["local", "ray"], typer.Option(
        help="local: a model in this process; ray: a pool of Ray actors (docs/datasets.md)")]
    = "local",
    address: Annotated[str | None, typer.Option(
        help="--engine ray: a running Ray cluster ('auto', 'ray://host:10001'); "
        "unset: Ray starts on this machine")] = None,
    workers: Annotated[int, typer.Option(min=1, help="--engine ray: actors, each "
                                         "holding the model once")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(
        min=0, help="--engine ray: GPUs per actor (0: CPU actors)")] = 0.0,
    fetch_timeout: Annotated[float | None, typer.Option(
        min=0.001, help="seconds one URL may take in all, then it is an error row "
        "(default: cleandift.datasets.sources.FETCH_TIMEOUT_S)")] = None,
    # No envvar here: CLEANDIFT_MODEL (a worker's spec) must not name a service's model;
    # without --service, Settings still reads it.
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="the model (as elsewhere; CLEANDIFT_MODEL when unset); with "
        "--service, the name of one of the service's models (its default when unset)")]
    = None,
    unet: UnetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Features of a whole dataset as sharded safetensors + index (streaming, resumable;
    read them with cleandift.datasets.FeatureDataset)."""
    from .bulk import Options
    from .bulk import extract_dataset as run
    from .sources import ReadLimits

    if engine == "ray" and service:
        raise typer.BadParameter("--engine ray computes with its own actors; --service "
                                 "sends to a running service: choose one")
    _layer_keys(layers)  # before anything is listed, loaded or written: a typo costs no wait
    _given_size(size)
    limits = ReadLimits() if fetch_timeout is None else ReadLimits(fetch_timeout_s=fetch_timeout)
    records = _list(source)  # before any model loads: a bad source costs no wait
    if engine == "ray":  # the actors load the model where they run; the driver only
        # writes, so it reads the model's facts from its files (no weights) as Ray starts
        args = settings_with(model=model, unet=unet, device=device,
                             dtype=dtype).extractor_args()
        facts = ThreadPoolExecutor(1).submit(_facts, args, concurrency, size, layers)
        _start_ray(address)
        info, side, keys = facts.result()
    else:
        compute, info, side, keys = _backend(service, concurrency, model, unet, device,
                                             dtype, size, layers)
    options = Options(source=source, layers=keys, size=side, dtype=out_dtype, grid=grid,
                      mode=mode, prompt=prompt, shard_size=shard_size,
                      batch_size=concurrency if service else batch_size)
    try:
        with user_errors():
            if engine == "ray":
                counts = _run_ray(out, options, info, limits, args, address, workers,
                                  gpus_per_worker, records)
            else:
                counts = run(out, options, compute(options), info, limits=limits,
                             records=records)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(json.dumps(counts))


def _list(source: str) -> list[Any]:
    from .sources import load_records

    try:
        with user_errors():
            return load_records(source)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _start_ray(address: str | None) -> None:
    from .ray_engine import start_ray

    try:
        start_ray(address)
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("ray"):
            raise
        raise typer.BadParameter("--engine ray needs Ray: pip install 'cleandift[ray]'") from exc


def _run_ray(out: str, options: Any, info: dict[str, str], limits: Any,
             extractor_args: dict[str, Any], address: str | None, workers: int,
             gpus: float, records: list[Any]) -> dict[str, int]:
    from .ray_engine import RayPlan, model_error, ray_extract

    plan = RayPlan(extractor_args=extractor_args, model=info, workers=workers,
                   gpus_per_worker=gpus,
                   address=address, torch_threads=_torch_threads())
    try:
        return ray_extract(out, options, plan, info, limits=limits, records=records)
    except Exception as exc:  # an actor could not load the model: one line, not Ray's stack
        message = model_error(exc)
        if message is None:
            raise
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from exc


def _torch_threads() -> int:
    """Each actor computes with the threads this process would use, so that its float
    rounding is the local engine's (a different thread count may sum in another order)."""
    import torch

    return torch.get_num_threads()


def _facts(args: dict[str, Any], concurrency: int, size: int | None, layers: str | None
           ) -> tuple[dict[str, str], int, list[str]]:
    """(model name/version, input size, layers) as a loaded model would give them. A hub
    id (no local configs) is loaded here to learn them, and so is a model with a --unet
    file: whether a user's file fits the base UNet is known only by loading it, and a
    misfit is better said here, at once and plainly, than by each actor."""
    from ..contract import check_size
    from ..loading import ModelLoadError, describe_model

    try:
        facts = None if args["unet"] else describe_model(
            args["spec"], cache_dir=args["cache_dir"], demo_seed=args["demo_seed"])
    except ModelLoadError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if facts is None:
        _, info, side, keys = _backend(None, concurrency, args["spec"], args["unet"], "cpu",
                                       args["dtype"], size, layers)
        return info, side, keys
    with user_errors():
        side = check_size(size if size is not None else facts.input_size)
    return ({"model": facts.name, "model_version": facts.version}, side,
            _layers(layers, facts.default_layers))


def _layers(asked: str | None, default: list[str]) -> list[str]:
    """--layers as given, else the model's default layers."""
    return asked.split(",") if asked else list(default)


def _backend(service: str | None, concurrency: int, model: str | None,
             unet: str | None, device: str | None, dtype: str | None,
             size: int | None, layers: str | None) -> tuple[Any, dict, int, list[str]]:
    """(compute factory, model name/version, input size, layers) of a service or a model."""
    from . import compute as bulk_compute

    if service:
        from ..client.session import Client

        # A long run rides through worker restarts and short outages (503, Retry-After).
        # --model names one of the service's models (its default when absent).
        client = Client(service, api_key=_client_api_key(), timeout=600, retry_budget_s=300,
                        model=model)
        client.wait_ready(timeout=300)
        served = client.models(model)
        info = {"model": served["name"], "model_version": served["version"]}
        keys = _layers(layers, served["default_layers"])
        side = size or int(served["input_size"])
        compute = partial(bulk_compute.service_compute, client, concurrency=concurrency,
                          model_version=info["model_version"])
        return compute, info, side, keys
    extractor, _ = _load(model, unet, device, dtype)
    info = {"model": extractor.info.name, "model_version": extractor.info.version}
    keys = _layers(layers, extractor.info.default_layers)
    return ((lambda o: bulk_compute.local_compute(extractor, o)), info,
            _input_size(extractor, size), keys)


def register(app: typer.Typer) -> None:
    app.command("extract-dataset")(extract_dataset)
