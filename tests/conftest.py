"""Suite-wide fixtures: a private model cache, the demo model, test images.

Nothing here downloads anything: the demo model is created from its config and seed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from tests.corpus import textured_image

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


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    return textured_image(320, 240, seed=1)


@pytest.fixture(scope="session")
def photo2() -> Image.Image:
    return textured_image(300, 280, seed=2)
