"""The `cleandift` command. Core commands are defined here; the service's and the
trainer's register themselves from their packages.

Heavy imports (torch, diffusers) happen inside commands so `--help` stays instant.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from .cli_options import (
    DeviceOpt,
    DtypeOpt,
    EvalDtypeOpt,
    ModelOpt,
    PromptOpt,
    SizeOpt,
    UnetOpt,
    _given_size,
    _input_size,
    _layer_keys,
    _load,
    user_errors,
)
from .datasets.cli import register as _register_dataset_command
from .method import DIFT_PROMPT

if TYPE_CHECKING:
    import numpy as np
    from typer._click import Command  # typer ships its own click

    from .settings import Settings

# Click's plain help: typer's rich panels would print `<bool>` after every flag.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None)


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
    """CleanDIFT: dense diffusion features from one clean forward pass, and semantic
    correspondences. Extract and match on this machine, serve them over HTTP, distil and
    publish a student, extract whole datasets. `cleandift COMMAND --help` for each."""

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


@app.command("demo-model")
def demo_model(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="folder to write")],
    seed: Annotated[int, typer.Option(help="weights seed")] = 0,
    kind: Annotated[Literal["demo", "demo15", "bench"],
                    typer.Option(help="demo, demo15 or bench")] = "demo",
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
    images: Annotated[list[Path], typer.Argument(metavar="IMAGES", help="image files")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output .safetensors")],
    layers: Annotated[str | None, typer.Option(help="comma-separated keys, e.g. us6,us9")] = None,
    size: SizeOpt = None,
    prompt: PromptOpt = "",
    mode: Annotated[Literal["clean", "dift"], typer.Option(help="clean or dift")] = "clean",
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
    _given_size(size)
    if not out.parent.is_dir():  # nor an hour of work with nowhere to write it
        typer.echo(f"error: --out: no folder {out.parent}", err=True)
        raise typer.Exit(2)
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
    source: Annotated[Path, typer.Argument(metavar="SOURCE", help="source image")],
    target: Annotated[Path, typer.Argument(metavar="TARGET", help="target image")],
    points: Annotated[str | None, typer.Option(help="JSON list of [x, y] source pixels")] = None,
    layer: Annotated[str | None, typer.Option(help="feature key; the model's default if unset")]
    = None,
    size: SizeOpt = None,
    prompt: PromptOpt = "",
    mode: Annotated[Literal["clean", "dift"], typer.Option(
        help="clean (one pass) or dift (the DIFT baseline: t=261, 8 noisy passes)")] = "clean",
    max_matches: Annotated[int | None, typer.Option(help="mutual matches without points")] = None,
    model: ModelOpt = None,
    unet: UnetOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Match points from SOURCE to TARGET; prints the JSON of POST /correspond."""
    from .contract import validate_points
    from .images import to_pixels
    from .matching import correspond as run_match

    # What can be checked without the model is checked before it loads: a typo costs no wait.
    chosen = _layer_keys(layer)
    _given_size(size)
    try:
        raw_points = json.loads(points) if points else None
    except json.JSONDecodeError as exc:
        typer.echo(f"error: --points is not JSON ({exc}): give e.g. '[[120, 80]]'", err=True)
        raise typer.Exit(2) from exc
    extractor, settings = _load(model, unet, device, None)
    side = _input_size(extractor, size)
    (src, src_size), (tgt, tgt_size) = (_read_image(p, side, settings) for p in (source, target))
    key = chosen[0] if chosen else extractor.info.correspondence_layer
    start = time.perf_counter()
    with user_errors():
        pts = validate_points(raw_points, src_size, settings.max_points) if points else None
        feats = extractor.features(to_pixels([src, tgt]), [key], prompt, mode=mode)[key]
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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    command()(prog_name="cleandift")


def command() -> Command:
    """The whole CLI as `main` runs it: every installed command, and the help's value
    placeholders in the usual form (`--port PORT`; choices as `<clean|dift>`) rather than
    typer's type names (`--port <int>`, `--model <list[str]>`)."""
    _register_optional_commands()
    root = typer.main.get_command(app)
    _plain_metavars(root)
    return root


def _plain_metavars(command: Command) -> None:
    for param in command.params:
        described = getattr(param, "type_descriptor", None)
        if param.param_type_name == "argument":  # IMAGES..., not {IMAGES}... <list[Path]>
            setattr(param, "display_type_rich", lambda ctx: None)  # noqa: B010 (an instance)
            setattr(param, "_usage_display_name", partial(_usage_name, param))  # noqa: B010
        elif (param.param_type_name == "option" and not getattr(param, "is_flag", False)
                and param.metavar is None and not getattr(described, "is_choice", False)):
            flag = next((o for o in param.opts if o.startswith("--")), param.name or "value")
            param.metavar = flag.lstrip("-").replace("-", "_").upper()  # choices: <a|b>
    for sub in getattr(command, "commands", {}).values():
        _plain_metavars(sub)


def _usage_name(param: Any) -> str:
    name = param.metavar or (param.name or "arg").upper()
    name = name if param.required else f"[{name}]"
    return name + ("..." if param.nargs != 1 else "")


def _register_optional_commands() -> None:
    """Service, trainer and bench commands live with their packages (eval-warps in its own
    module, to keep this one small); a command whose extra is not installed (e.g. `serve`
    without fastapi) is simply absent."""
    from importlib import import_module

    registered = {getattr(c.callback, "__module__", None) for c in app.registered_commands}
    for module in ("cleandift.warps_cli", "cleandift.service.cli", "cleandift.trainer.cli",
                   "cleandift.bench.cli"):
        if module in registered:  # called again (tests, `command()`): once is enough
            continue
        try:
            import_module(module).register(app)
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.startswith("cleandift"):
                raise


# extract-dataset lives in its own module (cli_options: what it shares with these).
_register_dataset_command(app)

if __name__ == "__main__":
    main()
