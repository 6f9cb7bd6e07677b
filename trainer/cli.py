"""`cleandift train | publish | demo-data`."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_type_hints

import typer

from cleandift.cli_options import settings_with, user_errors
from cleandift.method import STUDENT_TIMESTEP

from .config import TrainConfig

if TYPE_CHECKING:
    import torch


def _train(**options: Any) -> None:
    """Distil a CleanDIFT student from a base model (--model) and publish it as a new
    registry version."""
    from cleandift import registry as reg
    from cleandift.warps import gate_score

    from .train import train as run

    settings = settings_with()
    cfg = TrainConfig(**options, cache_dir=settings.cache_dir, redis_url=settings.redis_url,
                      channel=reg.announce_channel(settings.queue_prefix),
                      gate_margin=settings.gate_margin)
    with user_errors():  # a bad option (e.g. an indivisible batch): a message, exit 2
        published = run(cfg)
    if published:
        version, path = published
        manifest = json.loads((path / "manifest.json").read_text())
        typer.echo(json.dumps({k: manifest.get(k) for k in (
            "name", "version", "steps", "fidelity_before", "fidelity_after")} | {
            "warp_pck_before": gate_score(manifest.get("warps_before")),
            "warp_pck_after": gate_score(manifest.get("warps")), "path": str(path)}, indent=2))
        _refused_by_gate(manifest)


def _refused_by_gate(manifest: dict[str, Any]) -> None:
    """A trained version the quality gate kept from going live: exit 2, saying so."""
    gate = manifest.get("gate") or {}
    if not gate.get("allowed", True):
        typer.echo(f"error: {manifest['version']} was published but not made LATEST: "
                   f"{gate['message']}; `cleandift publish --promote {manifest['version']} "
                   "--force` makes it live", err=True)
        raise typer.Exit(2)


def command_from_dataclass(fn: Callable[..., None], config: type) -> Callable[..., None]:
    """`fn(**options)` with one typer option per CLI field of the dataclass `config`
    (its type, default and help), so the options are written only in the dataclass."""
    hints = get_type_hints(config)
    params, annotations = [], {}
    for f in fields(config):
        if not f.metadata.get("cli", True):
            continue
        option = typer.Option(*f.metadata.get("flags", ()), help=f.metadata.get("help", ""))
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
    unet: Annotated[Path | None, typer.Option(
        help="UNet safetensors to publish: flat, or an official full checkpoint (its "
        "student UNet alone is published)")] = None,
    base: Annotated[str | None, typer.Option(help="base model spec the UNet belongs to")] = None,
    promote: Annotated[str | None, typer.Option(help="make this existing VERSION LATEST")] = None,
    student_timestep: Annotated[float | None, typer.Option(
        help=f"timestep the student is served at (a flat --unet; default {STUDENT_TIMESTEP:g}); "
        "an official full checkpoint's learned timestep is recorded")] = None,
    force: Annotated[bool, typer.Option(
        help="make the version LATEST even if its warp score is below the live one's by more "
             "than the margin")] = False,
    margin: Annotated[float | None, typer.Option(
        envvar="CLEANDIFT_GATE_MARGIN",
        help="warp PCK@0.10 a version may lose against the live one (0.02)")] = None,
) -> None:
    """Publish an existing UNet file (e.g. the official CleanDIFT weights), or roll back."""
    from cleandift import registry as reg

    from .publish import announce

    with user_errors():  # a name or version that is not one path segment: a line, exit 2
        reg.check_segment(name)
        if promote:
            reg.check_segment(promote, "version")
    settings = settings_with(gate_margin=margin)
    channel = reg.announce_channel(settings.queue_prefix)
    if promote:
        gate_or_exit(registry, name, promote, settings.gate_margin, force)
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
    gate_or_exit(registry, name, None, settings.gate_margin, force)
    version, path = publish_existing(registry, name, unet, base, student_timestep,
                                     settings.redis_url, channel, settings.cache_dir)
    typer.echo(f"published {name} {version} at {path}")


def gate_or_exit(registry: Path, name: str, version: str | None, margin: float,
                 force: bool) -> None:
    """The quality gate before a version becomes LATEST: a refusal ends the command with
    one line and exit 2 unless forced; what cannot be compared is a warning."""
    from cleandift import registry as reg

    from .gate import check

    candidate: dict[str, Any] = {}
    if version is not None:
        try:
            candidate = reg.read_manifest(Path(registry) / name / version, verify=False)
        except reg.RegistryError:
            return  # promote names the problem itself
    verdict = check(registry, name, candidate, margin, version or "the new version")
    if verdict.allowed:
        if verdict.warning:
            typer.echo(f"warning: {verdict.message}", err=True)
        return
    if force:
        typer.echo(f"warning: forced: {verdict.message}", err=True)
        return
    typer.echo(f"error: refused: {verdict.message}", err=True)
    raise typer.Exit(2)


def publish_existing(registry: Path, name: str, unet: Path, base: str | None,
                     student_timestep: float | None, redis_url: str | None, channel: str,
                     cache_dir: Path | None) -> tuple[str, Path]:
    """Check the file loads strictly onto its base before it can become LATEST, then publish
    what is served from it. An official full checkpoint (student, teacher, VAE, heads) is
    served as its student UNet at its learned timestep: only those weights (a flat state
    dict, a fraction of the file) go into the version, and the manifest records that
    timestep, not 261."""
    from cleandift import official
    from cleandift.loading import ModelLoadError, load_extractor

    from .publish import publish_weights

    try:
        extractor = load_extractor(base, unet=unet, device="cpu", cache_dir=cache_dir)
    except ModelLoadError as exc:
        raise typer.BadParameter(str(exc)) from exc
    manifest: dict[str, Any] = {
        "base": extractor.base_spec, "input_size": extractor.info.input_size, "steps": None,
        "source": str(Path(unet).resolve())}
    del extractor  # checked; its weights need not stay in memory beside the file's
    weights: dict[str, torch.Tensor] | Path = Path(unet)
    full = official.is_full_file(Path(unet))
    served = STUDENT_TIMESTEP if student_timestep is None else student_timestep
    if full:
        checkpoint = official.read_full(Path(unet))
        if student_timestep is not None and student_timestep != checkpoint.timestep:
            raise typer.BadParameter(
                f"{unet} is a full checkpoint whose learned timestep {checkpoint.timestep:g} "
                "is the one served; leave out --student-timestep")
        weights, served = checkpoint.unet, checkpoint.timestep
    manifest["student_timestep"] = served
    manifest["source_format"] = "official full checkpoint (its student UNet)" if full else \
        "flat UNet state dict"
    return publish_weights(registry, name, weights, manifest, redis_url=redis_url,
                           channel=channel)


def demo_data(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="folder to write")],
    count: Annotated[int, typer.Option(help="number of images")] = 64,
    size: Annotated[int, typer.Option(help="side of each square image, in pixels")] = 320,
    seed: Annotated[int, typer.Option(help="seed of the images and captions")] = 0,
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
