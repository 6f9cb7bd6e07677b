"""The warp correspondence score (cleandift.warps) of the student being trained.

Measured before the first step and after the last on a few images (the held-out ones, or
a folder of `--eval-warps`), and written into the manifest, where the publishing gate
(gate.py) compares it with the live version's.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from PIL import Image

from cleandift.extractor import Extractor
from cleandift.layers import unet_features
from cleandift.sources import Record
from cleandift.warps import FeatureFn, Sample, evaluate, load_samples, read_samples

from .distill import Student

HOLDOUT, OFF = "holdout", "off"


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


def warp_score(extractor: Extractor, student: Student, samples: list[Sample], size: int,
               autocast: Callable[[], AbstractContextManager[Any]]) -> dict[str, Any] | None:
    """The student's warp report on the model's default layers, or None without images."""
    if not samples:
        return None
    info = extractor.info
    return evaluate(student_features(extractor, student, size, autocast), samples,
                    info.default_layers, layer=info.correspondence_layer)
