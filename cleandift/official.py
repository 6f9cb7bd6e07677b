"""The official full CleanDIFT checkpoint (`cleandift_sd21_full.safetensors`,
`cleandift_sd15_full.safetensors`): the state dict of the reference `StableFeatureAligner`.

Its keys (from CompVis/cleandift, src/sd_feature_extraction.py): the student UNet under
`unet_feature_extractor_cleandift.` and the frozen teacher under
`unet_feature_extractor_base.` (both with diffusers' UNet names), the VAE under `ae.ae.`,
the learned student timestep `timestep`, and the heads: `time_emb` (Fourier features),
`time_in_proj`, `mapping.*` (the mapping network) and `adapters.<key>.layers.<i>.*`.
The serving side needs the student UNet and the timestep; the trainer also takes the
heads (to resume or fine-tune). Only the needed tensors are read from the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

STUDENT = "unet_feature_extractor_cleandift."
TEACHER = "unet_feature_extractor_base."
VAE = "ae.ae."
TIMESTEP = "timestep"

# The heads' names: official template, ours (trainer/heads.py); {i} a layer number, {k} a key.
HEAD_NAMES: tuple[tuple[str, str], ...] = (
    ("time_emb.weight", "conditioning.fourier.weight"),
    ("time_in_proj.weight", "conditioning.proj.weight"),
    ("mapping.in_norm.scale", "conditioning.norm_in.scale"),
    ("mapping.out_norm.scale", "conditioning.norm_out.scale"),
    ("mapping.blocks.{i}.norm.scale", "conditioning.blocks.{i}.norm.scale"),
    ("mapping.blocks.{i}.up_proj.weight", "conditioning.blocks.{i}.up.weight"),
    ("mapping.blocks.{i}.down_proj.weight", "conditioning.blocks.{i}.down.weight"),
    ("adapters.{k}.layers.{i}.norm.linear.weight", "heads.{k}.layers.{i}.norm.modulation.weight"),
    ("adapters.{k}.layers.{i}.up_proj.weight", "heads.{k}.layers.{i}.up.weight"),
    ("adapters.{k}.layers.{i}.down_proj.weight", "heads.{k}.layers.{i}.down.weight"),
)
_FIELDS = {"i": r"(?P<i>\d+)", "k": r"(?P<k>\w+)"}


def _rename(name: str, official_to_ours: bool) -> str | None:
    for official, ours in HEAD_NAMES:
        source, target = (official, ours) if official_to_ours else (ours, official)
        pattern = re.escape(source).replace(r"\{i\}", _FIELDS["i"]).replace(r"\{k\}",
                                                                           _FIELDS["k"])
        match = re.fullmatch(pattern, name)
        if match:
            return target.format(**match.groupdict())
    return None


@dataclass
class FullCheckpoint:
    unet: dict[str, torch.Tensor]  # diffusers names
    timestep: float
    heads: dict[str, torch.Tensor] | None  # our names; None when not read


def is_full(keys: set[str] | list[str]) -> bool:
    return any(k.startswith(STUDENT) for k in keys) and TIMESTEP in keys


def is_full_file(path: Path) -> bool:
    """Whether a safetensors file is a full checkpoint (reads its header only)."""
    with safe_open(str(path), framework="pt") as fh:
        return is_full(set(fh.keys()))


def head_name(official: str) -> str | None:
    """Our name of an official head tensor (None: not a head tensor)."""
    return _rename(official, official_to_ours=True)


def read_full(path: Path, *, heads: bool = False) -> FullCheckpoint:
    """The student UNet and timestep (and the heads, renamed) of an official file."""
    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
        if not is_full(keys):
            raise ValueError(f"{path} is not a full CleanDIFT checkpoint (no {STUDENT}*, "
                             f"no {TIMESTEP})")
        unet = {k[len(STUDENT):]: fh.get_tensor(k) for k in keys if k.startswith(STUDENT)}
        timestep = float(fh.get_tensor(TIMESTEP).float().reshape(-1)[0])
        head_state = None
        if heads:
            head_state = {}
            for key in keys:
                ours = head_name(key)
                if ours is not None:
                    head_state[ours] = fh.get_tensor(key)
    return FullCheckpoint(unet=unet, timestep=timestep, heads=head_state)


def to_official(unet: dict[str, torch.Tensor], heads: dict[str, torch.Tensor], timestep: float,
                teacher: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Our student, heads and timestep under the official names (the inverse of
    `read_full`), e.g. to hand a fine-tuned model to the official code."""
    out = {STUDENT + k: v for k, v in unet.items()}
    if teacher is not None:
        out.update({TEACHER + k: v for k, v in teacher.items()})
    for ours, value in heads.items():
        out[official_head_name(ours)] = value
    out[TIMESTEP] = torch.tensor(float(timestep))
    return out


def official_head_name(ours: str) -> str:
    name = _rename(ours, official_to_ours=False)
    if name is None:
        raise KeyError(f"no official name for {ours}")
    return name
