"""The `cleandift` command: core commands here; service and trainer commands join below.

Heavy imports (torch, diffusers) happen inside commands so `--help` stays instant.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

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
    typer.Option("--model", "-m", help="diffusers folder, hub id or registry DIR/NAME (demo)"),
]
UnetOpt = Annotated[Path | None, typer.Option(help="flat UNet safetensors, e.g. CleanDIFT's")]
DeviceOpt = Annotated[str | None, typer.Option(help="cuda, cpu, ...; auto if unset")]
DtypeOpt = Annotated[str | None, typer.Option(help="float16, bfloat16, float32; auto if unset")]
SizeOpt = Annotated[int | None, typer.Option(help="model input side in px (multiple of 64)")]


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


def _load(model: str | None, unet: Path | None, device: str | None,
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
    from .contract import RequestError

    try:
        yield
    except (json.JSONDecodeError, RequestError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


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
    kind: Annotated[str, typer.Option(help="demo or bench")] = "demo",
) -> None:
    """Write the small SD2.1-shaped demo model (diffusers layout) to OUT_DIR."""
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
    """Print the model description (the body of GET /v1/models) as JSON."""
    extractor, _ = _load(model, unet, device, None)
    typer.echo(extractor.info.model_dump_json(indent=2))


@app.command()
def extract(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output .safetensors")],
    layers: Annotated[str | None, typer.Option(help="comma-separated keys, e.g. us6,us9")] = None,
    size: SizeOpt = None,
    prompt: str = "",
    mode: Annotated[str, typer.Option(help="clean or dift")] = "clean",
    batch_size: int = 8,
    model: ModelOpt = None,
    unet: UnetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Extract feature maps; tensors are named by key (IMAGE_STEM/key for several images)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .images import to_pixels

    extractor, settings = _load(model, unet, device, dtype)
    side = _input_size(extractor, size)
    keys = layers.split(",") if layers else None
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
    prompt: str = "",
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
    split: str = "test",
    layer: Annotated[str | None, typer.Option(help="feature key; the model's default")] = None,
    size: SizeOpt = None,
    prompt: Annotated[str | None, typer.Option(help="'{category}' is filled in")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here")]
    = None,
    model: ModelOpt = None,
    unet: UnetOpt = None,
    device: DeviceOpt = None,
) -> None:
    """PCK@0.05/0.10/0.15 on SPair-71k with the DIFT protocol; prints a JSON report."""
    from .spair import evaluate, load_pairs

    extractor, _ = _load(model, unet, device, None)
    try:
        pairs = load_pairs(data, split=split, category=category, limit=limit)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    with user_errors():
        report = evaluate(extractor, pairs, mode=mode, layer=layer, size=size, prompt=prompt)
    text = json.dumps(report, indent=2)
    if json_out:
        json_out.write_text(text + "\n")
    typer.echo(text)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    _register_optional_commands()
    app(prog_name="cleandift")


def _register_optional_commands() -> None:
    """Service, trainer and bench commands live with their packages; a command whose
    extra is not installed (e.g. `serve` without fastapi) is simply absent."""
    from importlib import import_module

    for module in ("cleandift.service.cli", "cleandift.trainer.cli", "cleandift.bench.cli"):
        try:
            import_module(module).register(app)
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.startswith("cleandift"):
                raise


if __name__ == "__main__":
    main()
