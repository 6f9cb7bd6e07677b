"""Python client of the feature service, sync (`Client`) and async (`AsyncClient`).

Features travel as safetensors (raw float16, no base64) and come back as numpy arrays.
Problems (problem+json) become typed exceptions; 429 and 503 are retried, honouring
Retry-After, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import load as load_safetensors

ImageLike = str | Path | bytes | Any  # a path, raw file bytes, a PIL image or an HWC uint8 array
RETRYABLE = (429, 503)


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


def retry_delay(response: httpx.Response, attempt: int) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return min(8.0, 0.5 * 2**attempt)


def _features_request(image, layers, size, prompt, dtype, mode) -> dict:
    data: dict[str, str] = {"prompt": prompt, "mode": mode}
    if layers:
        data["layers"] = ",".join([layers] if isinstance(layers, str) else layers)
    if size:
        data["size"] = str(size)
    return {"url": "/features", "params": {"format": "safetensors", "dtype": dtype},
            "files": {"image": ("image", image_bytes(image))}, "data": data}


def _correspond_request(source, target, points, layer, size, prompt, max_matches) -> dict:
    data: dict[str, str] = {"prompt": prompt}
    if points is not None:
        data["points"] = json.dumps([[float(x), float(y)] for x, y in points])
    for name, value in (("layer", layer), ("size", size), ("max_matches", max_matches)):
        if value is not None:
            data[name] = str(value)
    files = {"source": ("source", image_bytes(source)), "target": ("target", image_bytes(target))}
    return {"url": "/correspond", "files": files, "data": data}


class _Base:
    def __init__(self, url: str, api_key: str | None, timeout: float, retries: int) -> None:
        self.url, self.retries, self.timeout = url.rstrip("/"), retries, timeout
        self.headers = {"X-API-Key": api_key} if api_key else {}


class Client(_Base):
    """Blocking client: `Client("http://localhost:8000").features("photo.jpg")`."""

    def __init__(self, url: str = "http://localhost:8000", api_key: str | None = None,
                 timeout: float = 120.0, retries: int = 3) -> None:
        super().__init__(url, api_key, timeout, retries)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def _send(self, method: str, url: str, **kwargs) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = self._http.request(method, url, **kwargs)
            if response.status_code not in RETRYABLE or attempt == self.retries:
                break
            time.sleep(retry_delay(response, attempt))
        raise_for_problem(response)
        return response

    def features(self, image: ImageLike, layers: str | list[str] | None = None,
                 size: int | None = None, prompt: str = "", dtype: str = "float16",
                 mode: str = "clean") -> dict[str, np.ndarray]:
        """{key: array [C, H, W]} for one image."""
        request = _features_request(image, layers, size, prompt, dtype, mode)
        return load_safetensors(self._send("POST", **request).content)

    def correspond(self, source: ImageLike, target: ImageLike, points=None,
                   layer: str | None = None, size: int | None = None, prompt: str = "",
                   max_matches: int | None = None) -> dict:
        request = _correspond_request(source, target, points, layer, size, prompt, max_matches)
        return self._send("POST", **request).json()

    def models(self) -> dict:
        return self._send("GET", "/v1/models").json()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


class AsyncClient(_Base):
    """The same calls, awaitable: `await AsyncClient(url).features(image)`."""

    def __init__(self, url: str = "http://localhost:8000", api_key: str | None = None,
                 timeout: float = 120.0, retries: int = 3) -> None:
        super().__init__(url, api_key, timeout, retries)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout)

    async def _send(self, method: str, url: str, **kwargs) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = await self._http.request(method, url, **kwargs)
            if response.status_code not in RETRYABLE or attempt == self.retries:
                break
            await asyncio.sleep(retry_delay(response, attempt))
        raise_for_problem(response)
        return response

    async def features(self, image: ImageLike, layers: str | list[str] | None = None,
                       size: int | None = None, prompt: str = "", dtype: str = "float16",
                       mode: str = "clean") -> dict[str, np.ndarray]:
        request = _features_request(image, layers, size, prompt, dtype, mode)
        return load_safetensors((await self._send("POST", **request)).content)

    async def correspond(self, source: ImageLike, target: ImageLike, points=None,
                         layer: str | None = None, size: int | None = None, prompt: str = "",
                         max_matches: int | None = None) -> dict:
        request = _correspond_request(source, target, points, layer, size, prompt, max_matches)
        return (await self._send("POST", **request)).json()

    async def models(self) -> dict:
        return (await self._send("GET", "/v1/models")).json()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.aclose()
