"""`cleandift train | publish | demo-data`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cleandift.cli import settings_with


def train(
    data: Annotated[str, typer.Option(help="image folder, or shards 'dir/{00000..00009}.tar'")],
    registry: Annotated[Path, typer.Option(help="registry DIR to publish into")],
    name: Annotated[str, typer.Option(help="model NAME in the registry")],
    teacher: Annotated[str | None, typer.Option(help="base model spec; the demo model if unset")]
    = None,
    steps: int = 400,
    batch_size: int = 8,
    lr: float = 1e-5,
    warmup: Annotated[int, typer.Option(help="linear warm-up steps")] = 2000,
    size: Annotated[int | None, typer.Option(help="input side; the model's if unset")] = None,
    precision: Annotated[str, typer.Option(help="bf16 or fp32 (bf16 on GPU only)")] = "bf16",
    grad_checkpointing: bool = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the blocks")] = False,
    save_every: Annotated[int, typer.Option(help="checkpoint every K steps (0: never)")] = 100,
    resume: Annotated[bool, typer.Option("--resume", help="continue the latest checkpoint")]
    = False,
    seed: int = 0,
    holdout: Annotated[int, typer.Option(help="held-out images for the fidelity metric")] = 8,
    output_dir: Annotated[Path | None, typer.Option(help="checkpoints and log.jsonl")] = None,
) -> None:
    """Distil a CleanDIFT student from TEACHER and publish it as a new registry version."""
    from cleandift import registry as reg

    from .train import TrainConfig
    from .train import train as run

    if precision not in ("bf16", "fp32"):
        raise typer.BadParameter("precision must be bf16 or fp32")
    settings = settings_with()
    cfg = TrainConfig(
        data=data, registry=registry, name=name, teacher=teacher, steps=steps,
        batch_size=batch_size, lr=lr, warmup=warmup, size=size, precision=precision,
        grad_checkpointing=grad_checkpointing, compile=compile, save_every=save_every,
        resume=resume, seed=seed, holdout=holdout, output_dir=output_dir,
        cache_dir=settings.cache_dir, redis_url=settings.redis_url,
        channel=reg.announce_channel(settings.queue_prefix),
    )
    published = run(cfg)
    if published:
        version, path = published
        manifest = json.loads((path / "manifest.json").read_text())
        typer.echo(json.dumps({k: manifest[k] for k in (
            "name", "version", "steps", "fidelity_before", "fidelity_after")} | {
            "path": str(path)}, indent=2))


def publish(
    registry: Annotated[Path, typer.Option(help="registry DIR")],
    name: Annotated[str, typer.Option(help="model NAME")],
    unet: Annotated[Path | None, typer.Option(help="flat UNet safetensors to publish")] = None,
    base: Annotated[str | None, typer.Option(help="base model spec the UNet belongs to")] = None,
    promote: Annotated[str | None, typer.Option(help="make this existing VERSION LATEST")] = None,
    student_timestep: float = 261.0,
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
    manifest = {"base": extractor.info.base, "input_size": extractor.info.input_size,
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
    app.command()(train)
    app.command()(publish)
    app.command("demo-data")(demo_data)
