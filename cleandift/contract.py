"""The request-level rules shared by the core, the CLI and the API: feature keys, input
sizes and points. Pure Python, no torch, so the API process stays slim.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# Key -> (dotted module path in UNet2DConditionModel), in execution order.
LAYER_MODULES: dict[str, str] = {
    "mid": "mid_block",
    "us1": "up_blocks.0.resnets.0",
    "us2": "up_blocks.0.resnets.1",
    "us3": "up_blocks.0",
    "us4": "up_blocks.1.attentions.0",
    "us5": "up_blocks.1.attentions.1",
    "us6": "up_blocks.1",
    "us7": "up_blocks.2.attentions.0",
    "us8": "up_blocks.2.attentions.1",
    "us9": "up_blocks.2",
    "us10": "up_blocks.3.attentions.0",
}
LAYER_KEYS: tuple[str, ...] = tuple(LAYER_MODULES)
CORRESPONDENCE_LAYER = "us6"
SIZE_MULTIPLE = 64


class UnknownLayerError(ValueError):
    """A requested feature key is not one of the 11 public keys."""


class InvalidSizeError(ValueError):
    pass


class InvalidPointsError(ValueError):
    pass


def validate_layers(layers: Iterable[str] | None, default: Iterable[str]) -> list[str]:
    """Return the requested keys in execution order, without duplicates."""
    wanted = list(default if layers is None else layers)
    unknown = [k for k in wanted if k not in LAYER_MODULES]
    if unknown:
        raise UnknownLayerError(
            f"unknown layer(s) {unknown}; valid keys are {list(LAYER_KEYS)}"
        )
    if not wanted:
        raise UnknownLayerError("at least one layer must be requested")
    return [k for k in LAYER_KEYS if k in set(wanted)]


def check_size(size: int, *, lo: int = SIZE_MULTIPLE, hi: int | None = None) -> int:
    if size % SIZE_MULTIPLE or size < lo or (hi is not None and size > hi):
        bound = f" and at most {hi}" if hi is not None else ""
        raise InvalidSizeError(
            f"size must be a multiple of {SIZE_MULTIPLE}, at least {lo}{bound}; got {size}"
        )
    return size


def validate_points(points: object, size: tuple[int, int], max_points: int) -> list[list[float]]:
    """A JSON-ish list of [x, y] inside an image of size (W, H) -> list of float pairs."""
    width, height = size
    if not isinstance(points, list | tuple):
        raise InvalidPointsError("points must be a list of [x, y] pairs")
    if len(points) > max_points:
        raise InvalidPointsError(f"{len(points)} points given; at most {max_points} allowed")
    out = []
    for i, point in enumerate(points):
        ok = isinstance(point, list | tuple) and len(point) == 2
        ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in point)
        if not ok:
            raise InvalidPointsError(f"point {i} is not an [x, y] pair of numbers: {point!r}")
        x, y = float(point[0]), float(point[1])
        if not (math.isfinite(x) and math.isfinite(y)):
            raise InvalidPointsError(f"point {i} is not finite: {point!r}")
        if not (-0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5):
            raise InvalidPointsError(
                f"point {i} ({x}, {y}) is outside the {width}x{height} source image"
            )
        out.append([x, y])
    return out
