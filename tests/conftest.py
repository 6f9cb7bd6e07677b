"""Suite-wide fixtures: a private model cache, the demo model, test images.

Nothing here downloads anything: the demo model is created from its config and seed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_CACHE = Path(tempfile.mkdtemp(prefix="cleandift-test-cache-"))
os.environ.setdefault("CLEANDIFT_CACHE_DIR", str(_CACHE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ["CLEANDIFT_CACHE_DIR"])


@pytest.fixture(scope="session")
def demo_dir(cache_dir: Path) -> Path:
    from cleandift.demo import ensure_model

    return ensure_model("demo", cache_dir, seed=0)


@pytest.fixture(scope="session")
def extractor(demo_dir: Path):
    from cleandift import load_extractor

    return load_extractor(demo_dir, device="cpu")


def textured_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random colour field with structure at several scales (unique features)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    image = np.zeros((height, width, 3))
    for _ in range(12):
        fx, fy = rng.uniform(1, 12, size=2)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        image += np.sin(2 * np.pi * (fx * xs + fy * ys)[..., None] + phase)
    image = (image - image.min()) / (image.max() - image.min())
    return Image.fromarray((image * 255).astype(np.uint8))


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    return textured_image(320, 240, seed=1)


@pytest.fixture(scope="session")
def photo2() -> Image.Image:
    return textured_image(300, 280, seed=2)
