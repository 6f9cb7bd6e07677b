"""The request-level rules shared by the core, the CLI and the API: feature keys, input
sizes, points, and the description of a served model. Pure Python, no torch, so the API
process stays slim.

Every rule violation is a `RequestError`: the API maps that one class to 422 and the CLI
to exit code 2, so no caller re-wraps errors one by one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

from .method import CORRESPONDENCE_LAYER, LAYER_KEYS, LAYER_MODULES, SIZE_MULTIPLE, STUDENT_TIMESTEP

# int8 answers carry each layer's per-channel scales as the tensor KEY + SCALE_SUFFIX.
SCALE_SUFFIX = ".scale"

# Characters of a client's value that an error message repeats at most.
ECHO_CHARS = 200


def shown(value: object, limit: int = ECHO_CHARS) -> str:
    """repr(value) cut to `limit` characters: an error names the offending input without
    sending a megabyte of it back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


class RequestError(ValueError):
    """A request parameter breaks a rule of the contract (HTTP 422, CLI exit 2)."""


class UsageError(ValueError):
    """A command's options cannot work together, or do not fit its inputs (CLI exit 2)."""


class UnknownLayerError(RequestError):
    """A requested feature key is not one of the 11 public keys."""


class InvalidSizeError(RequestError):
    pass


class InvalidPointsError(RequestError):
    pass


class LayerInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    channels: int
    stride: int  # input pixels per feature cell, at the model's input size


class ModelInfo(BaseModel):
    """What clients see of the served model (GET /v1/models); it also travels in Redis."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str
    base: str
    input_size: int
    default_layers: list[str]
    correspondence_layer: str = CORRESPONDENCE_LAYER
    layers: dict[str, LayerInfo]
    student_timestep: float = STUDENT_TIMESTEP


def validate_layers(layers: Iterable[str] | None, default: Iterable[str]) -> list[str]:
    """Return the requested keys in execution order, without duplicates."""
    wanted = list(default if layers is None else layers)
    unknown = [k for k in wanted if k not in LAYER_MODULES]
    if unknown:
        raise UnknownLayerError(
            f"unknown layer(s) {shown(unknown)}; valid keys are {list(LAYER_KEYS)}"
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
    if not points:  # nothing to read or match at: leave points out for the whole map
        raise InvalidPointsError("points is empty: give at least one [x, y] pair, or leave "
                                 "points out (the whole map; mutual matches on /correspond)")
    if len(points) > max_points:
        raise InvalidPointsError(f"{len(points)} points given; at most {max_points} allowed")
    out = []
    for i, point in enumerate(points):
        ok = isinstance(point, list | tuple) and len(point) == 2
        ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in point)
        if not ok:
            raise InvalidPointsError(
                f"point {i} is not an [x, y] pair of numbers: {shown(point)}")
        try:
            x, y = float(point[0]), float(point[1])
        except OverflowError as exc:  # a 400-digit integer
            raise InvalidPointsError(f"point {i} is out of range: {shown(point)}") from exc
        if not (math.isfinite(x) and math.isfinite(y)):
            raise InvalidPointsError(f"point {i} is not finite: {shown(point)}")
        if not (-0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5):
            raise InvalidPointsError(
                f"point {i} ({x}, {y}) is outside the {width}x{height} source image"
            )
        out.append([x, y])
    return out
