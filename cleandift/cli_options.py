"""What the `cleandift` commands share: their common options and how a command loads a
model, reads settings and turns a user's mistake into one line and exit code 2. Apart from
cli.py so that commands in other modules (extract-dataset, eval-warps) can import it
while cli.py registers them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from pydantic import ValidationError

    from .extractor import Extractor
    from .settings import Settings

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

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        typer.echo(f"error: {settings_problem(exc, flags=set(given))}", err=True)
        raise typer.Exit(2) from exc


def settings_problem(exc: ValidationError, flags: set[str]) -> str:
    """pydantic's report in one line a person reads: the setting as it was given (its flag,
    or its CLEANDIFT_ variable), what it accepts, what it got."""
    parts = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else "settings"
        env = "CLEANDIFT_" + name.upper()  # flags read the same variable
        where = f"--{name.replace('_', '-')} ({env})" if name in flags else env
        message = error["msg"].removeprefix("Value error, ")
        described = _described(name)
        if error["type"] == "string_pattern_mismatch" and described:  # a regex says little
            message = f"expected {described}"
        parts.append(f"{where}: {message} (got {error.get('input')!r})")
    return "invalid " + "; ".join(parts)


def _described(name: str) -> str | None:
    from .settings import Settings

    field = Settings.model_fields.get(name)
    return field.description if field is not None else None


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


def _given_size(size: int | None) -> None:
    """--size checked before the model loads: a typo costs no wait."""
    from .contract import check_size

    if size is not None:
        with user_errors():
            check_size(size)


def _input_size(extractor: Extractor, size: int | None) -> int:
    from .contract import check_size

    with user_errors():
        return check_size(size if size is not None else extractor.info.input_size)


def _client_api_key() -> str | None:
    """The client's key: the same CLEANDIFT_API_KEY the service reads."""
    key = settings_with().api_key
    return key.get_secret_value() if key is not None else None
