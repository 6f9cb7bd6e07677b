"""The warp correspondence score (cleandift.warps) of the student being trained.

Measured before the first step and after the last on a few images (the held-out ones, or
a folder of `--eval-warps`), and written into the manifest, where the publishing gate
(gate.py) compares it with the live version's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cleandift.datasets.sources import Record
from cleandift.extractor import Extractor
from cleandift.layers import unet_features
from cleandift.loading import load_extractor
from cleandift.warps import (
    FeatureFn,
    Sample,
    evaluate,
    extractor_features,
    load_samples,
    read_samples,
)

from .distill import Student

HOLDOUT, OFF = "holdout", "off"

log = logging.getLogger(__name__)


def eval_samples(choice: str, held: list[Record]) -> list[Sample]:
    """The images to score on: the held-out training images, another source, or none."""
    if choice == OFF:
        return []
    samples, _ = read_samples(held) if choice == HOLDOUT else load_samples(choice)
    return samples


def student_features(extractor: Extractor, student: Student, size: int,
                     autocast: Callable[[], AbstractContextManager[Any]]) -> FeatureFn:
    """What the student would serve: its raw features on the clean latent, at its learned
    timestep, with the empty prompt (the heads are training-only)."""

    def features(images: list[Image.Image], keys: list[str]) -> dict[str, torch.Tensor]:
        pixels = extractor.preprocess(images, size).to(extractor.device, extractor.dtype)
        with torch.no_grad():
            posterior = extractor.vae.encode(pixels).latent_dist
            x0 = (posterior.mean * extractor.vae.config.scaling_factor).float()
            context = extractor.prompts("").float()
            with autocast():
                return unet_features(student.unet, x0, student.timestep.expand(len(x0)),
                                     context, keys)

    return features


def conditions(size: int, dtype: torch.dtype) -> dict[str, Any]:
    """What a score depends on besides the images and protocol (see warps.fingerprint):
    the input size, and the precision the UNet ran in (bf16 autocast counts as bf16)."""
    return {"size": size, "dtype": str(dtype).removeprefix("torch.")}


def warp_score(extractor: Extractor, student: Student, samples: list[Sample], size: int,
               autocast: Callable[[], AbstractContextManager[Any]],
               dtype: torch.dtype) -> dict[str, Any] | None:
    """The student's warp report on the model's default layers, or None without images."""
    if not samples:
        return None
    info = extractor.info
    return evaluate(student_features(extractor, student, size, autocast), samples,
                    info.default_layers, layer=info.correspondence_layer,
                    conditions=conditions(size, dtype))


def live_scorer(model_dir: Path, samples: list[Sample], size: int, *, device: torch.device,
                dtype: torch.dtype, autocast: Callable[[], AbstractContextManager[Any]],
                cache_dir: Path | None) -> Callable[[str], dict | None]:
    """Scores a published version on the candidate's images, size and precision (fp32
    weights under the candidate's autocast, as the student is scored), for the gate: the
    live version's own report was usually measured on other held-out images (another
    run, another seed), and two scores on different images say nothing."""

    def score(version: str) -> dict | None:
        if not samples:
            log.warning("no images to score the live %s on", version)
            return None
        try:
            report = _score_version(model_dir / version, samples, size, device, dtype,
                                    autocast, cache_dir)
        except Exception as exc:  # out of memory, a broken version: the gate says so
            log.warning("the live %s could not be scored on these images: %s", version, exc)
            return None
        finally:  # the live weights are gone with _score_version's frame
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return report

    return score


def _score_version(path: Path, samples: list[Sample], size: int, device: torch.device,
                   dtype: torch.dtype, autocast: Callable[[], AbstractContextManager[Any]],
                   cache_dir: Path | None) -> dict[str, Any]:
    live = load_extractor(path, device=device, dtype=torch.float32, cache_dir=cache_dir)
    features = extractor_features(live, size)

    def run(images: list[Image.Image], keys: list[str]) -> dict[str, torch.Tensor]:
        with autocast():
            return features(images, keys)

    info = live.info
    return evaluate(run, samples, info.default_layers, layer=info.correspondence_layer,
                    conditions=conditions(size, dtype))
