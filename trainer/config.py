"""The trainer's configuration: every parameter, its default and its help, written once.

`cleandift train` builds its options from these fields, so the CLI and the Python API
(`train(TrainConfig(...))`) cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cleandift.contract import UsageError
from cleandift.registry import announce_channel
from cleandift.settings import GATE_MARGIN


def _opt(default: object, help: str) -> Any:  # noqa: A002  (typer's word)
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    data: str = field(metadata={"help": "image folder, or shards 'dir/{00000..00009}.tar'"})
    registry: Path = field(metadata={"help": "registry DIR to publish into"})
    name: str = field(metadata={"help": "model NAME in the registry"})
    teacher: str | None = field(default=None, metadata={
        "help": "the teacher (base) model: diffusers folder, hub id, demo or demo15; the "
                "demo model if unset", "flags": ("--model", "-m", "--teacher")})
    steps: int = _opt(400, "optimiser steps")
    batch_size: int = _opt(8, "images per optimiser step over all processes (the "
                           "recipe's 8); each of N processes takes batch_size / N")
    lr: float = _opt(1e-5, "peak learning rate (Adam)")
    warmup: int = _opt(2000, "linear warm-up steps")
    size: int | None = _opt(None, "input side; the model's if unset")
    precision: Literal["fp32", "bf16"] = _opt(
        "fp32", "fp32 with TF32 matmuls (the official code) or bf16 autocast (GPU); the "
        "noise schedule, add_noise and the Fourier features are fp32 either way")
    grad_checkpointing: bool = _opt(False, "recompute activations in the backward pass")
    compile: bool = _opt(False, "torch.compile the UNet blocks")
    save_every: int = _opt(100, "checkpoint every K steps (0: never)")
    resume: bool = _opt(False, "continue the latest checkpoint")
    seed: int = _opt(0, "seed of the data order, timesteps and noise")
    holdout: int = _opt(8, "held-out images for the fidelity metric")
    eval_warps: str = _opt(
        "holdout", "images of the warp correspondence score (cleandift eval-warps), measured "
        "before and after training into the manifest for the publishing gate: 'holdout' (the "
        "held-out images), a folder, list file or shards, or 'off'")
    force: bool = _opt(False, "make the new version LATEST even if its warp score is below "
                       "the live one's by more than the margin (CLEANDIFT_GATE_MARGIN)")
    output_dir: Path | None = _opt(None, "checkpoints and log.jsonl (default REGISTRY/NAME/.runs)")
    init_from: Path | None = _opt(None, "start from an official full checkpoint "
                                  "(cleandift_*_full.safetensors): student, heads, timestep")
    # Parity with the official code, where it differs and the paper says it does not matter.
    latent: Literal["mean", "sample"] = _opt(
        "mean", "clean latent: the VAE posterior mean, or a sample as the official code")
    t_range: Literal["full", "official"] = _opt(
        "full", "teacher timesteps: full = [0, 999]; official = [1, 998] as its code draws")
    resize: Literal["bicubic", "bilinear"] = _opt(
        "bicubic", "training resize; bilinear as the official data loader")
    # From the settings, not the command line:
    cache_dir: Path | None = field(default=None, metadata={"cli": False})
    redis_url: str | None = field(default=None, metadata={"cli": False})
    channel: str = field(default=announce_channel("cleandift"), metadata={"cli": False})
    gate_margin: float = field(default=GATE_MARGIN, metadata={"cli": False})

    def per_process_batch(self, world: int) -> int:
        """The global batch split over `world` processes; it must divide evenly."""
        if self.batch_size % world:
            nearest = world * max(1, self.batch_size // world)
            raise UsageError(f"--batch-size {self.batch_size} is the global batch and must "
                             f"divide by the {world} processes (e.g. {nearest})")
        return self.batch_size // world

    @property
    def run_dir(self) -> Path:
        return self.output_dir or Path(self.registry) / self.name / ".runs"
