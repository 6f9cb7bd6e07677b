"""The `cleandift` command: core commands here; service and trainer commands join below.

Heavy imports (torch, diffusers) happen inside commands so `--help` stays instant.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .method import DIFT_PROMPT

if TYPE_CHECKING:
    import numpy as np

    from .extractor import Extractor
    from .settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"cleandift {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """CleanDIFT features and correspondences: core commands, the service and the trainer."""

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", envvar="CLEANDIFT_MODEL",
                 help="diffusers folder, hub id, registry DIR/NAME, demo or demo15 (demo)"),
]
UnetOpt = Annotated[str | None, typer.Option(
    envvar="CLEANDIFT_UNET",
    help="UNet file (flat or official full checkpoint), or hf://OWNER/REPO/FILE")]
DeviceOpt = Annotated[str | None, typer.Option(envvar="CLEANDIFT_DEVICE",
                                               help="cuda, cpu, mps, ...; auto if unset")]
DtypeOpt = Annotated[str | None, typer.Option(envvar="CLEANDIFT_DTYPE",
                                              help="float16, bfloat16, float32; auto if unset")]
SizeOpt = Annotated[int | None, typer.Option(help="model input side in px (multiple of 64)")]
EvalDtypeOpt = Annotated[str, typer.Option(
    help="evaluation precision: float32 (default) or bfloat16; float16 on request")]
PromptOpt = Annotated[str, typer.Option(
    help="text conditioning of the UNet; '' (the default) is the method's empty prompt")]


def settings_with(**overrides: Any) -> Settings:
    """Settings from the environment, with the CLI flags that were given on top; a bad
    value ends the command with the setting's name and exit code 2."""
    from pydantic import ValidationError

    from .settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        typer.echo(f"error: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from exc


def _load(model: str | None, unet: str | None, device: str | None,
          dtype: str | None) -> tuple[Extractor, Settings]:
    from .loading import ModelLoadError, load_extractor

    settings = settings_with(model=model, unet=unet, device=device, dtype=dtype)
    typer.echo(f"loading {settings.model or 'the demo model'} …", err=True)
    try:
        return load_extractor(**settings.extractor_args()), settings  # type: ignore[arg-type]
    except ModelLoadError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad arguments end the command with a message and exit code 2, not a traceback."""
    from .contract import RequestError, UsageError

    try:
        yield
    except (json.JSONDecodeError, RequestError, UsageError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _layer_keys(layers: str | None) -> list[str] | None:
    """--layers as keys (None: the model's defaults); unknown names end the command."""
    from .contract import validate_layers

    if not layers:
        return None
    with user_errors():
        return validate_layers(layers.split(","), [])


def _read_image(path: Path, size: int, settings: Settings) -> tuple[np.ndarray, tuple[int, int]]:
    """The model's view of an image file (the same decoding as the API), and its size."""
    from .images import ImageError, decode_for_model

    try:
        data = path.read_bytes()
        return decode_for_model(data, size, max_bytes=len(data),
                                max_pixels=settings.max_image_pixels)
    except (OSError, ImageError) as exc:
        typer.echo(f"error: {path}: {exc}", err=True)
        raise typer.Exit(2) from exc


def _input_size(extractor: Extractor, size: int | None) -> int:
    from .contract import check_size

    with user_errors():
        return check_size(size if size is not None else extractor.info.input_size)


@app.command("demo-model")
def demo_model(
    out_dir: Path,
    seed: Annotated[int, typer.Option(help="weights seed")] = 0,
    kind: Annotated[str, typer.Option(help="demo, demo15 or bench")] = "demo",
) -> None:
    """Write a small built-in model (diffusers layout) to OUT_DIR: the SD2.1-shaped demo
    (default), the SD1.5-shaped demo15 or the larger bench."""
    from .architectures import ARCHITECTURES
    from .demo import write_model

    arch = ARCHITECTURES[kind]
    typer.echo(f"creating {arch.name} (seed {seed}) in {out_dir} …", err=True)
    start = time.perf_counter()
    write_model(arch, out_dir, seed=seed)
    size = sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())
    typer.echo(f"done in {time.perf_counter() - start:.1f}s, {size / 1e6:.1f} MB", err=True)


@app.command()
def info(model: ModelOpt = None, unet: UnetOpt = None, device: DeviceOpt = None) -> None:
    """Print the model description as JSON: the body of GET /v1/models when a service
    serves this model alone (with these settings' limits)."""
    from .service.api.schemas import ModelsOut

    extractor, settings = _load(model, unet, device, None)
    typer.echo(ModelsOut.of_one(extractor.info, settings).model_dump_json(indent=2))


@app.command()
def extract(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output .safetensors")],
    layers: Annotated[str | None, typer.Option(help="comma-separated keys, e.g. us6,us9")] = None,
    size: SizeOpt = None,
    prompt: PromptOpt = "",
    mode: Annotated[str, typer.Option(help="clean or dift")] = "clean",
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 8,
    model: ModelOpt = None,
    unet: UnetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Extract feature maps; tensors are named by key (IMAGE_STEM/key for several images)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .images import to_pixels

    keys = _layer_keys(layers)  # before the model loads: a typo costs no wait
    extractor, settings = _load(model, unet, device, dtype)
    side = _input_size(extractor, size)
    tensors = {}
    for start in tqdm(range(0, len(images), batch_size), desc="extract", unit="batch"):
        paths = images[start : start + batch_size]
        batch = [_read_image(p, side, settings)[0] for p in paths]
        with user_errors():
            results = extractor.features(to_pixels(batch), keys, prompt, mode=mode)
        for i, path in enumerate(paths):
            for key, value in results.items():
                name = key if len(images) == 1 else f"{path.stem}/{key}"
                tensors[name] = value[i].float().cpu().contiguous()
    meta = {
        "model": extractor.info.name,
        "model_version": extractor.info.version,
        "input_size": str(side),
    }
    save_file(tensors, str(out), metadata=meta)
    typer.echo(f"wrote {len(tensors)} tensors to {out}", err=True)


@app.command()
def correspond(
    source: Path,
    target: Path,
    points: Annotated[str | None, typer.Option(help="JSON list of [x, y] source pixels")] = None,
    layer: Annotated[str | None, typer.Option(help="feature key; the model's default if unset")]
    = None,
    size: SizeOpt = None,
    prompt: PromptOpt = "",
    max_matches: Annotated[int | None, typer.Option(help="mutual matches without points")] = None,
    model: ModelOpt = None,
    unet: UnetOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Match points from SOURCE to TARGET; prints the JSON of POST /correspond."""
    from .contract import validate_points
    from .images import to_pixels
    from .matching import correspond as run_match

    extractor, settings = _load(model, unet, device, None)
    side = _input_size(extractor, size)
    (src, src_size), (tgt, tgt_size) = (_read_image(p, side, settings) for p in (source, target))
    key = layer or extractor.info.correspondence_layer
    start = time.perf_counter()
    with user_errors():
        pts = validate_points(json.loads(points), src_size, settings.max_points) if points else None
        feats = extractor.features(to_pixels([src, tgt]), [key], prompt)[key]
    matches = run_match(
        feats[0], feats[1], src_size, tgt_size, pts,
        max_matches=max_matches or settings.max_matches,
    )
    elapsed = (time.perf_counter() - start) * 1000
    body = {
        "model": extractor.info.name,
        "model_version": extractor.info.version,
        "matches": [m.to_json() for m in matches],
        "timings_ms": {"queue": 0.0, "inference": round(elapsed, 3)},
    }
    typer.echo(json.dumps(body, indent=2))


@app.command("eval-spair")
def eval_spair(
    data: Annotated[Path, typer.Option(help="SPair-71k root (PairAnnotation/, JPEGImages/)")],
    mode: Annotated[str, typer.Option(help="clean (one pass) or dift (8 noisy passes)")]
    = "clean",
    limit: Annotated[int | None, typer.Option(help="evaluate the first N pairs")] = None,
    category: Annotated[str | None, typer.Option(help="one category only")] = None,
    split: Annotated[str, typer.Option(help="SPair-71k split: trn, val or test")] = "test",
    layer: Annotated[str | None, typer.Option(help="feature key; the model's default")] = None,
    size: SizeOpt = None,
    prompt: Annotated[str, typer.Option(
        help="the prompt of both modes, '{category}' filled in; '' for none")] = DIFT_PROMPT,
    seed: Annotated[int, typer.Option(help="base of the per-image DIFT noise seeds")] = 0,
    allow_approximate: Annotated[bool, typer.Option(
        help="report PCK even when some matches stopped early (labelled approximate)")]
    = False,
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="write the full JSON report (per category too) here")] = None,
    model: ModelOpt = None,
    unet: UnetOpt = None,
    device: DeviceOpt = None,
    dtype: EvalDtypeOpt = "float32",
) -> None:
    """PCK@0.05/0.10/0.15 on SPair-71k with DIFT's matching, along every protocol axis
    (<= or <, target bbox or image, per image or per keypoint); prints a table."""
    from .spair import evaluate, format_report, load_pairs

    extractor, _ = _load(model, unet, device, dtype)
    try:
        pairs = load_pairs(data, split=split, category=category, limit=limit)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    with user_errors():
        report = evaluate(extractor, pairs, mode=mode, layer=layer, size=size, prompt=prompt,
                          seed=seed, allow_approximate=allow_approximate)
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(format_report(report))


@app.command("extract-dataset")
def extract_dataset(
    source: Annotated[str, typer.Argument(
        help="image folder, list file (paths or URLs, one per line) or shards 'd/{0..9}.tar'")],
    out: Annotated[Path, typer.Option(help="output folder (resumed when it exists)")],
    layers: Annotated[str | None, typer.Option(help="comma-separated keys; the model's "
                                               "default layers")] = None,
    size: SizeOpt = None,
    out_dtype: Annotated[str, typer.Option(
        "--out-dtype", help="float16, bfloat16, float32, or int8 (per-channel scales)")]
    = "float16",
    grid: Annotated[int | None, typer.Option(help="pool each map to GRID x GRID")] = None,
    mode: Annotated[str, typer.Option(help="clean or dift")] = "clean",
    prompt: PromptOpt = "",
    shard_size: Annotated[int, typer.Option(help="images per shard file")] = 256,
    batch_size: Annotated[int, typer.Option(help="images per forward pass (local)")] = 8,
    service: Annotated[str | None, typer.Option(
        help="a running service's URL: it computes, this command writes")] = None,
    concurrency: Annotated[int, typer.Option(help="requests in flight (--service)")] = 16,
    fetch_timeout: Annotated[float | None, typer.Option(
        min=0.001, help="seconds one URL may take in all, then it is an error row "
        "(default: cleandift.sources.FETCH_TIMEOUT_S)")] = None,
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
    read them with cleandift.dataset.FeatureDataset)."""
    from .bulk import DTYPES, Options
    from .bulk import extract_dataset as run
    from .sources import ReadLimits

    if out_dtype not in (*DTYPES, "int8"):
        raise typer.BadParameter(f"--out-dtype must be one of {[*DTYPES, 'int8']}")
    limits = ReadLimits() if fetch_timeout is None else ReadLimits(fetch_timeout_s=fetch_timeout)
    compute, info, side, keys = _dataset_backend(service, concurrency, model, unet, device,
                                                 dtype, size, layers)
    options = Options(source=source, layers=keys, size=side, dtype=out_dtype, grid=grid,
                      mode=mode, prompt=prompt, shard_size=shard_size,
                      batch_size=concurrency if service else batch_size)
    try:
        with user_errors():
            counts = run(out, options, compute(options), info, limits=limits)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(json.dumps(counts))


def _dataset_backend(service: str | None, concurrency: int, model: str | None,
                     unet: str | None, device: str | None, dtype: str | None,
                     size: int | None, layers: str | None) -> tuple[Any, dict, int, list[str]]:
    """(compute factory, model name/version, input size, layers) of a service or a model."""
    from . import bulk_compute

    if service:
        from .client import Client

        # A long run rides through worker restarts and short outages (503, Retry-After).
        # --model names one of the service's models (its default when absent).
        client = Client(service, api_key=_client_api_key(), timeout=600, retry_budget_s=300,
                        model=model)
        client.wait_ready(timeout=300)
        served = client.models(model)
        info = {"model": served["name"], "model_version": served["version"]}
        keys = layers.split(",") if layers else list(served["default_layers"])
        side = size or int(served["input_size"])
        compute = partial(bulk_compute.service_compute, client, concurrency=concurrency,
                          model_version=info["model_version"])
        return compute, info, side, keys
    extractor, _ = _load(model, unet, device, dtype)
    info = {"model": extractor.info.name, "model_version": extractor.info.version}
    keys = layers.split(",") if layers else list(extractor.info.default_layers)
    return ((lambda o: bulk_compute.local_compute(extractor, o)), info,
            _input_size(extractor, size), keys)


def _client_api_key() -> str | None:
    """The client's key: the same CLEANDIFT_API_KEY the service reads."""
    key = settings_with().api_key
    return key.get_secret_value() if key is not None else None


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    _register_optional_commands()
    app(prog_name="cleandift")


def _register_optional_commands() -> None:
    """Service, trainer and bench commands live with their packages (eval-warps in its own
    module, to keep this one small); a command whose extra is not installed (e.g. `serve`
    without fastapi) is simply absent."""
    from importlib import import_module

    for module in ("cleandift.warps_cli", "cleandift.service.cli", "cleandift.trainer.cli",
                   "cleandift.bench.cli"):
        try:
            import_module(module).register(app)
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.startswith("cleandift"):
                raise


if __name__ == "__main__":
    main()
