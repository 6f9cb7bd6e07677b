"""Synthetic captioned images, so the trainer can be tried with no dataset at hand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200),
           "yellow": (230, 200, 40), "purple": (130, 50, 160), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")


def synthetic_image(size: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A textured background with a few coloured shapes, and a caption saying so."""
    names = list(COLOURS)
    background = names[rng.integers(len(names))]
    noise = rng.normal(0, 25, (size, size, 3)) + np.array(COLOURS[background]) * 0.6
    image = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(2))
    draw = ImageDraw.Draw(image)
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        colour, shape = names[rng.integers(len(names))], SHAPES[rng.integers(len(SHAPES))]
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(size // 12, size // 4))
        box = [x - r, y - r, x + r, y + r]
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
        parts.append(f"a {colour} {shape}")
    return image, f"{' and '.join(parts)} on a {background} background"


def write_images(out_dir: Path, count: int, size: int, seed: int) -> Iterator[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image, caption = synthetic_image(size, rng)
        path = out_dir / f"{i:05d}.jpg"
        image.save(path, quality=92)
        path.with_suffix(".txt").write_text(caption + "\n")
        yield path
