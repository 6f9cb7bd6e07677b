"""`cleandift bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def bench(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", envvar="CLEANDIFT_MODEL",
        help="model spec (as for serve); the built-in bench model if unset")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="fewer repeats (under 3 minutes)")]
    = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the figures here")]
    = None,
    parts: Annotated[str, typer.Option(help="comma-separated: model, service, transport, "
                                       "outputs, fleet, queue, datasets")]
    = "model,service,transport,outputs",
) -> None:
    """Measure extractor, service, transport and trainer side by side on this machine."""
    from .cpu import PARTS, run_bench, table, write_json

    chosen = tuple(p.strip() for p in parts.split(",") if p.strip())
    unknown = set(chosen) - set(PARTS)
    if unknown:
        raise typer.BadParameter(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    figures = run_bench(model, quick, chosen)
    typer.echo(table(figures))
    if json_out:
        write_json(figures, json_out)


def register(app: typer.Typer) -> None:
    app.command()(bench)
