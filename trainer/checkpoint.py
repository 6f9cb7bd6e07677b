"""Resumable checkpoints: weights, optimizer, RNG and data position, written atomically.

Weights are safetensors; the optimizer state is read back with `weights_only=True`, so a
checkpoint can never execute code when loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "LATEST"


@dataclass
class TrainState:
    step: int
    cursor: int  # samples drawn by the data stream
    skipped: int  # corrupt images skipped so far
    fidelity_before: dict | None = None
    warps_before: dict | None = None  # the warp score at step 0 (quality.py)


def save_checkpoint(run_dir: Path, state: TrainState, student: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, generator: torch.Generator) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=run_dir))
    weights = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    save_file(weights, str(staging / "student.safetensors"))
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save({"generator": generator.get_state(), "torch": torch.get_rng_state()},
               staging / "rng.pt")
    (staging / "state.json").write_text(json.dumps(asdict(state), indent=2))
    target = run_dir / f"step_{state.step:06d}"
    if target.exists():
        shutil.rmtree(target)
    os.rename(staging, target)
    tmp = run_dir / f".{LATEST}.tmp"
    tmp.write_text(target.name)
    os.replace(tmp, run_dir / LATEST)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    try:
        return run_dir / (run_dir / LATEST).read_text().strip()
    except FileNotFoundError:
        return None


def load_checkpoint(path: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> TrainState:
    student.load_state_dict(load_file(str(path / "student.safetensors")), strict=True)
    optimizer.load_state_dict(
        torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    )
    rng = torch.load(path / "rng.pt", weights_only=True, map_location="cpu")
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    return TrainState(**json.loads((path / "state.json").read_text()))
