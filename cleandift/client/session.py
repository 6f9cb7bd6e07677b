"""`Client` and `AsyncClient`: requests, retries, answers (the package docstring has the
whole story; wire.py turns answers and problems into values and exceptions)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import httpx

from .wire import (
    ERRORS,
    RETRYABLE,
    ApiError,
    BadImage,
    DeadlineExceeded,
    Features,
    ImageLike,
    InvalidParameters,
    NotReady,
    Overloaded,
    Points,
    TooLarge,
    Unauthorized,
    UnsupportedMediaType,
    correspond_request,
    features_answer,
    features_request,
    raise_for_problem,
    retry_delay,
    targets_of,
)

__all__ = ["ERRORS", "ApiError", "AsyncClient", "BadImage", "Client", "DeadlineExceeded",
           "Features", "InvalidParameters", "NotReady", "Overloaded", "TooLarge",
           "Unauthorized", "UnsupportedMediaType"]
TRANSIENT = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError,
             httpx.PoolTimeout, httpx.ConnectTimeout)


RETRY_BUDGET_S = 60.0


def models_path(name: str | None) -> str:
    return "/v1/models" if name is None else f"/v1/models/{quote(name, safe='')}"


class _Base:
    def __init__(self, url: str, api_key: str | None, timeout: float, retries: int,
                 backoff: float, retry_budget_s: float = RETRY_BUDGET_S,
                 model: str | None = None) -> None:
        self.url, self.retries, self.timeout = url.rstrip("/"), retries, timeout
        self.backoff, self.retry_budget_s = backoff, retry_budget_s
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.model = model  # the served model every request names (None: the default)

    def _for_model(self, request: dict[str, Any], model: str | None) -> dict[str, Any]:
        """The request, naming `model` (or the client's) when one is chosen."""
        chosen = model or self.model
        if chosen:
            request["params"] = {**request.get("params", {}), "model": chosen}
        return request

    def _retry_in(self, response: httpx.Response | None, attempt: int, started: float
                  ) -> float | None:
        """Seconds to wait before the next try, or None to give up: after `retries` tries,
        only while the next one would start within `retry_budget_s` of the first."""
        if response is not None and response.status_code not in RETRYABLE:
            return None
        delay = retry_delay(response, attempt, self.backoff)
        if attempt < self.retries or time.monotonic() + delay - started <= self.retry_budget_s:
            return delay
        return None


class Client(_Base):
    """Blocking client: `Client("http://localhost:8000").features("photo.jpg")`."""

    def __init__(self, url: str = "http://localhost:8000", api_key: str | None = None,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 0.5,
                 retry_budget_s: float = RETRY_BUDGET_S, model: str | None = None) -> None:
        super().__init__(url, api_key, timeout, retries, backoff, retry_budget_s, model)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        started, attempt = time.monotonic(), 0
        while True:
            try:
                response: httpx.Response | None = self._http.request(method, url, **kwargs)
            except TRANSIENT:
                delay = self._retry_in(None, attempt, started)
                if delay is None:
                    raise
                response = None
            else:
                delay = self._retry_in(response, attempt, started)
                if delay is None:
                    break
            time.sleep(delay)
            attempt += 1
        assert response is not None
        raise_for_problem(response)
        return response

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> dict[str, Any]:
        """Wait until a worker has loaded the model; returns GET /readyz's body."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = self._http.get("/readyz")
                if response.status_code == 200:
                    body: dict[str, Any] = response.json()
                    return body
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url} was not ready within {timeout:.0f} s")
            time.sleep(interval)

    def features(self, image: ImageLike, layers: str | Sequence[str] | None = None,
                 size: int | None = None, prompt: str = "", dtype: str = "float16",
                 mode: str = "clean", *, points: Points | None = None, grid: int | None = None,
                 raw: bool = False, model: str | None = None) -> Features:
        """{key: array} for one image: maps [C, h, w], or descriptors [N, C] at `points`
        (pixels of the image), or maps pooled to `grid` x `grid`. dtype int8 and bfloat16
        arrive compact and are returned as float32 (`raw=True`: as sent, with scales)."""
        request = features_request(image, layers=layers, size=size, prompt=prompt, dtype=dtype,
                                   mode=mode, points=points, grid=grid)
        request = self._for_model(request, model)
        return features_answer(self._send("POST", **request), raw)

    def features_many(self, images: Sequence[ImageLike], concurrency: int = 4,
                      **options: Any) -> list[Features]:
        """`features` of each image, `concurrency` in flight at once; results in order."""
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(lambda image: self.features(image, **options), images))

    def correspond(self, source: ImageLike, target: ImageLike | None = None, *,
                   targets: Sequence[ImageLike] | None = None, points: Points | None = None,
                   layer: str | None = None, size: int | None = None, prompt: str = "",
                   max_matches: int | None = None, mode: str = "clean",
                   heatmap: bool = False, model: str | None = None) -> dict[str, Any]:
        """Matches from SOURCE to one target (`matches`), or to several at once (`targets`:
        `results`, one per target, the source computed once)."""
        request = correspond_request(source, targets_of(target, targets), points=points,
                                     layer=layer, size=size, prompt=prompt,
                                     max_matches=max_matches, mode=mode, heatmap=heatmap)
        body: dict[str, Any] = self._send("POST", **self._for_model(request, model)).json()
        return body

    def models(self, name: str | None = None) -> dict[str, Any]:
        """GET /v1/models (every served model under `models`), or one model by name."""
        body: dict[str, Any] = self._send("GET", models_path(name)).json()
        return body

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The same calls, awaitable: `await AsyncClient(url).features(image)`."""

    def __init__(self, url: str = "http://localhost:8000", api_key: str | None = None,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 0.5,
                 retry_budget_s: float = RETRY_BUDGET_S, model: str | None = None) -> None:
        super().__init__(url, api_key, timeout, retries, backoff, retry_budget_s, model)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout)

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        started, attempt = time.monotonic(), 0
        while True:
            try:
                response: httpx.Response | None = await self._http.request(method, url,
                                                                           **kwargs)
            except TRANSIENT:
                delay = self._retry_in(None, attempt, started)
                if delay is None:
                    raise
                response = None
            else:
                delay = self._retry_in(response, attempt, started)
                if delay is None:
                    break
            await asyncio.sleep(delay)
            attempt += 1
        assert response is not None
        raise_for_problem(response)
        return response

    async def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = await self._http.get("/readyz")
                if response.status_code == 200:
                    body: dict[str, Any] = response.json()
                    return body
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url} was not ready within {timeout:.0f} s")
            await asyncio.sleep(interval)

    async def features(self, image: ImageLike, layers: str | Sequence[str] | None = None,
                       size: int | None = None, prompt: str = "", dtype: str = "float16",
                       mode: str = "clean", *, points: Points | None = None,
                       grid: int | None = None, raw: bool = False,
                       model: str | None = None) -> Features:
        request = features_request(image, layers=layers, size=size, prompt=prompt, dtype=dtype,
                                   mode=mode, points=points, grid=grid)
        request = self._for_model(request, model)
        return features_answer(await self._send("POST", **request), raw)

    async def features_many(self, images: Sequence[ImageLike], concurrency: int = 4,
                            **options: Any) -> list[Features]:
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(image: ImageLike) -> Features:
            async with gate:
                return await self.features(image, **options)

        return list(await asyncio.gather(*(one(image) for image in images)))

    async def correspond(self, source: ImageLike, target: ImageLike | None = None, *,
                         targets: Sequence[ImageLike] | None = None,
                         points: Points | None = None, layer: str | None = None,
                         size: int | None = None, prompt: str = "",
                         max_matches: int | None = None, mode: str = "clean",
                         heatmap: bool = False, model: str | None = None) -> dict[str, Any]:
        request = correspond_request(source, targets_of(target, targets), points=points,
                                     layer=layer, size=size, prompt=prompt,
                                     max_matches=max_matches, mode=mode, heatmap=heatmap)
        body: dict[str, Any] = (await self._send("POST",
                                                 **self._for_model(request, model))).json()
        return body

    async def models(self, name: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = (await self._send("GET", models_path(name))).json()
        return body

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()
