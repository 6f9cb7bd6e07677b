"""The client's side of the HTTP contract, without any connection: how requests are built
and answers read. `client.py` sends them (sync and async) with retries.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ..contract import SCALE_SUFFIX
from .tensors import bfloat16_to_float32, dequantize_int8, read_safetensors

ImageLike = str | Path | bytes | Any  # a path, raw file bytes, a PIL image or an HWC uint8 array
Points = Sequence[Sequence[float]]


class ApiError(Exception):
    """A problem+json answer: `status`, `title`, `detail`, `type`."""

    def __init__(self, status: int, title: str, detail: str, type_: str = "") -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title, self.detail, self.type = status, title, detail, type_


class BadImage(ApiError): ...
class Unauthorized(ApiError): ...
class TooLarge(ApiError): ...
class UnsupportedMediaType(ApiError): ...
class InvalidParameters(ApiError): ...
class Overloaded(ApiError): ...
class NotReady(ApiError): ...
class DeadlineExceeded(ApiError): ...


ERRORS = {400: BadImage, 401: Unauthorized, 413: TooLarge, 415: UnsupportedMediaType,
          422: InvalidParameters, 429: Overloaded, 503: NotReady, 504: DeadlineExceeded}
RETRYABLE = (429, 503)


class Features(dict[str, np.ndarray]):
    """`{key: array}` of one image, and what the answer said about itself: `model`,
    `model_version`, `layout` (map [C, h, w], points [N, C] or grid [C, g, g]),
    `image_size` (width, height), `input_size`, `cached` (no forward pass was needed),
    `etag` (send it as If-None-Match to skip an answer you hold)."""

    model: str = ""
    model_version: str = ""
    layout: str = "map"
    image_size: tuple[int, int] = (0, 0)
    input_size: int = 0
    cached: bool = False
    etag: str = ""


def image_bytes(image: ImageLike) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, str | Path):
        return Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        from PIL import Image

        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: the service sees exactly these pixels
    return buf.getvalue()


def raise_for_problem(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
        title, detail, kind = body.get("title", ""), body.get("detail", ""), body.get("type", "")
    except ValueError:
        title, detail, kind = response.reason_phrase, response.text[:500], ""
    raise ERRORS.get(response.status_code, ApiError)(response.status_code, title, detail, kind)


def retry_delay(response: httpx.Response | None, attempt: int, backoff: float) -> float:
    """Retry-After when the service says it; else exponential back-off, at most 8 s."""
    if response is not None:
        try:
            return max(0.0, float(response.headers.get("retry-after", "")))
        except ValueError:
            pass
    return min(8.0, backoff * 2**attempt)


def features_request(image: ImageLike, *, layers: str | Sequence[str] | None,
                     size: int | None, prompt: str, dtype: str, mode: str,
                     points: Points | None, grid: int | None) -> dict[str, Any]:
    data: dict[str, str] = {"prompt": prompt, "mode": mode}
    if layers:
        data["layers"] = ",".join([layers] if isinstance(layers, str) else layers)
    if size:
        data["size"] = str(size)
    if points is not None:
        data["points"] = json.dumps([[float(x), float(y)] for x, y in points])
    if grid is not None:
        data["grid"] = str(grid)
    return {"url": "/features", "params": {"format": "safetensors", "dtype": dtype},
            "files": {"image": ("image", image_bytes(image))}, "data": data}


def features_answer(response: httpx.Response, raw: bool) -> Features:
    """The safetensors answer as arrays (views into the received bytes). Unless `raw`,
    int8 values are dequantized with their scales and bfloat16 widened, to float32."""
    arrays, metadata, dtypes = read_safetensors(response.content)
    out = Features()
    channel_axis = 1 if metadata.get("layout") == "points" else 0
    for key, array in arrays.items():
        if raw or key.endswith(SCALE_SUFFIX):
            if raw:
                out[key] = array
            continue
        if dtypes[key] == "I8":
            out[key] = dequantize_int8(array, arrays[key + SCALE_SUFFIX], channel_axis)
        elif dtypes[key] == "BF16":
            out[key] = bfloat16_to_float32(array)
        else:
            out[key] = array
    out.model, out.model_version = metadata.get("model", ""), metadata.get("model_version", "")
    out.layout = metadata.get("layout", "map")
    out.image_size = (int(metadata.get("image_width", 0)), int(metadata.get("image_height", 0)))
    out.input_size = int(metadata.get("input_size", 0))
    out.cached = response.headers.get("x-cache") == "hit"
    out.etag = response.headers.get("etag", "")
    return out


def correspond_request(source: ImageLike, targets: Sequence[ImageLike], *,
                       points: Points | None, layer: str | None, size: int | None,
                       prompt: str, max_matches: int | None, mode: str,
                       heatmap: bool) -> dict[str, Any]:
    data: dict[str, str] = {"prompt": prompt, "mode": mode}
    if points is not None:
        data["points"] = json.dumps([[float(x), float(y)] for x, y in points])
    for name, value in (("layer", layer), ("size", size), ("max_matches", max_matches)):
        if value is not None:
            data[name] = str(value)
    if heatmap:
        data["heatmap"] = "true"
    files = [("source", ("source", image_bytes(source)))]
    files += [("target", (f"target{i}", image_bytes(t))) for i, t in enumerate(targets)]
    return {"url": "/correspond", "files": files, "data": data}


def targets_of(target: ImageLike | None, targets: Sequence[ImageLike] | None
               ) -> list[ImageLike]:
    chosen = ([target] if target is not None else []) + list(targets or [])
    if not chosen:
        raise ValueError("give a target, or several as targets=[...]")
    return chosen
