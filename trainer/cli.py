"""`cleandift train | publish | demo-data`."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

from cleandift.cli import settings_with, user_errors
from cleandift.method import STUDENT_TIMESTEP

from .config import TrainConfig


def _train(**options: Any) -> None:
    """Distil a CleanDIFT student from TEACHER and publish it as a new registry version."""
    from cleandift import registry as reg

    from .train import train as run

    settings = settings_with()
    cfg = TrainConfig(**options, cache_dir=settings.cache_dir, redis_url=settings.redis_url,
                      channel=reg.announce_channel(settings.queue_prefix))
    with user_errors():  # a bad option (e.g. an indivisible batch): a message, exit 2
        published = run(cfg)
    if published:
        version, path = published
        manifest = json.loads((path / "manifest.json").read_text())
        typer.echo(json.dumps({k: manifest[k] for k in (
            "name", "version", "steps", "fidelity_before", "fidelity_after")} | {
            "path": str(path)}, indent=2))


def command_from_dataclass(fn: Callable[..., None], config: type) -> Callable[..., None]:
    """`fn(**options)` with one typer option per CLI field of the dataclass `config`
    (its type, default and help), so the options are written only in the dataclass."""
    hints = get_type_hints(config)
    params, annotations = [], {}
    for f in fields(config):
        if not f.metadata.get("cli", True):
            continue
        option = typer.Option(help=f.metadata.get("help", ""))
        kind = Annotated.__class_getitem__((hints[f.name], option))  # type: ignore[attr-defined]
        default = inspect.Parameter.empty if f.default is MISSING else f.default
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=default, annotation=kind))
        annotations[f.name] = kind

    @functools.wraps(fn)
    def command(**options: Any) -> None:
        fn(**options)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = annotations
    return command


train = command_from_dataclass(_train, TrainConfig)


def publish(
    registry: Annotated[Path, typer.Option(help="registry DIR")],
    name: Annotated[str, typer.Option(help="model NAME")],
    unet: Annotated[Path | None, typer.Option(help="flat UNet safetensors to publish")] = None,
    base: Annotated[str | None, typer.Option(help="base model spec the UNet belongs to")] = None,
    promote: Annotated[str | None, typer.Option(help="make this existing VERSION LATEST")] = None,
    student_timestep: float = STUDENT_TIMESTEP,
) -> None:
    """Publish an existing UNet file (e.g. the official CleanDIFT weights), or roll back."""
    from cleandift import registry as reg

    from .publish import announce

    settings = settings_with()
    channel = reg.announce_channel(settings.queue_prefix)
    if promote:
        try:
            reg.promote(registry, name, promote)
        except reg.RegistryError as exc:
            raise typer.BadParameter(str(exc)) from exc
        if settings.redis_url:
            announce(settings.redis_url, channel, registry, name, promote)
        typer.echo(f"{name}: LATEST is now {promote}")
        return
    if unet is None:
        raise typer.BadParameter("give --unet FILE (with --base) or --promote VERSION")
    version, path = publish_existing(registry, name, unet, base, student_timestep,
                                     settings.redis_url, channel, settings.cache_dir)
    typer.echo(f"published {name} {version} at {path}")


def publish_existing(registry, name, unet, base, student_timestep, redis_url, channel, cache_dir):
    """Check the file loads strictly onto its base before it can become LATEST."""
    from cleandift.loading import ModelLoadError, load_extractor

    from .publish import publish_weights

    try:
        extractor = load_extractor(base, unet=unet, device="cpu", cache_dir=cache_dir)
    except ModelLoadError as exc:
        raise typer.BadParameter(str(exc)) from exc
    manifest = {"base": extractor.base_spec, "input_size": extractor.info.input_size,
                "student_timestep": student_timestep, "steps": None,
                "source": str(Path(unet).resolve())}
    return publish_weights(registry, name, Path(unet), manifest, redis_url=redis_url,
                           channel=channel)


def demo_data(
    out_dir: Path,
    count: Annotated[int, typer.Option(help="number of images")] = 64,
    size: int = 320,
    seed: int = 0,
) -> None:
    """Write COUNT synthetic images with caption sidecars (to try the trainer offline)."""
    from tqdm import tqdm

    from .synthetic import write_images

    for _ in tqdm(write_images(out_dir, count, size, seed), total=count, desc="images"):
        pass


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command()(publish)
    app.command("demo-data")(demo_data)
