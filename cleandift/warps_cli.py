"""`cleandift eval-warps`: the self-supervised correspondence score of a model (warps.py).

Kept beside cli.py (which registers it) so that module stays small.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .cli_options import (
    DeviceOpt,
    EvalDtypeOpt,
    ModelOpt,
    SizeOpt,
    UnetOpt,
    _given_size,
    _input_size,
    _layer_keys,
    _load,
    user_errors,
)


def eval_warps(
    images: Annotated[str, typer.Argument(metavar="IMAGES",
        help="image folder, list file or shards 'd/{0..9}.tar' (any images: no labels)")],
    layers: Annotated[str | None, typer.Option(
        help="comma-separated keys; the model's default layers (the correspondence layer "
             "is always added)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the warps (with each image's bytes)")] = 0,
    grid: Annotated[int, typer.Option(min=1, help="GRID x GRID source points per image")] = 8,
    size: SizeOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here")]
    = None,
    model: ModelOpt = None,
    unet: UnetOpt = None,
    device: DeviceOpt = None,
    dtype: EvalDtypeOpt = "float32",
) -> None:
    """PCK@0.05/0.10 under known warps (homography, crop + rescale, flip), per layer: a
    label-free proxy of correspondence quality; prints a JSON report."""
    from . import warps

    chosen = _layer_keys(layers)  # before the model loads
    _given_size(size)
    extractor, _ = _load(model, unet, device, dtype)
    side = _input_size(extractor, size)
    try:
        samples, skipped = warps.load_samples(images)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if not samples:
        typer.echo(f"error: no readable image (of at least {warps.MIN_SIDE} px) in {images}",
                   err=True)
        raise typer.Exit(2)
    keys = chosen or list(extractor.info.default_layers)
    with user_errors():
        report = warps.evaluate(warps.extractor_features(extractor, side), samples, keys,
                                layer=extractor.info.correspondence_layer, seed=seed, grid=grid,
                                conditions={"size": side, "dtype": str(extractor.dtype)
                                            .removeprefix("torch.")})
    report = {"model": extractor.info.name, "model_version": extractor.info.version,
              "size": side, "dtype": str(extractor.dtype).removeprefix("torch."),
              "skipped_images": skipped, **report}
    for key, scores in report["layers"].items():
        typer.echo(f"{key}: PCK@0.05 {scores['pck@0.05']}  PCK@0.10 {scores['pck@0.10']}  "
                   f"({scores['points']} points)", err=True)
    text = json.dumps(report, indent=2)
    if json_out:
        json_out.write_text(text + "\n")
    typer.echo(text)


def register(app: typer.Typer) -> None:
    app.command("eval-warps")(eval_warps)
