"""`cleandift bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def bench(
    model: Annotated[str | None, typer.Option(help="model spec; the built-in bench model")]
    = None,
    quick: Annotated[bool, typer.Option("--quick", help="fewer repeats (under 3 minutes)")]
    = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the figures here")]
    = None,
) -> None:
    """Measure extractor, service and trainer side by side on this machine's CPU."""
    from .cpu import run_bench, table, write_json

    figures = run_bench(model, quick)
    typer.echo(table(figures))
    if json_out:
        write_json(figures, json_out)


def register(app: typer.Typer) -> None:
    app.command()(bench)
