"""A bounded HTTP load generator (asyncio + httpx), shared by the benchmark and the
reliability tests: N requests at a fixed concurrency, latencies and statuses recorded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class LoadResult:
    wall_s: float
    latencies_s: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # transport errors (no HTTP status)
    retry_after: list[str | None] = field(default_factory=list)  # header of each 429/503

    @property
    def ok(self) -> int:
        return sum(s == 200 for s in self.statuses)

    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else 0.0


RequestFactory = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


async def _run(url: str, request: RequestFactory, concurrency: int, total: int,
               timeout_s: float, headers: dict[str, str] | None) -> LoadResult:
    result = LoadResult(wall_s=0.0)
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits,
                                 headers=headers) as client:

        async def user() -> None:
            for _ in counter:
                start = time.perf_counter()
                try:
                    response = await request(client)
                except httpx.HTTPError as exc:
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                result.latencies_s.append(time.perf_counter() - start)
                result.statuses.append(response.status_code)
                if response.status_code in (429, 503):
                    result.retry_after.append(response.headers.get("retry-after"))

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - start
    return result


def _run_sync(url, request, concurrency, total, timeout_s, headers) -> LoadResult:
    return asyncio.run(_run(url, request, concurrency, total, timeout_s, headers))


def run_load(url: str, request: RequestFactory, *, concurrency: int, total: int,
             timeout_s: float = 120.0, headers: dict[str, str] | None = None,
             processes: int = 1) -> LoadResult:
    """Send `total` requests from `concurrency` concurrent users; returns when all ended.

    With `processes` > 1 the users are spread over that many client processes, so that
    parsing large responses in Python does not make the client the bottleneck.
    """
    if processes <= 1:
        return _run_sync(url, request, concurrency, total, timeout_s, headers)
    from concurrent.futures import ProcessPoolExecutor

    shares = [(concurrency // processes + (i < concurrency % processes),
               total // processes + (i < total % processes)) for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        parts = list(pool.map(_run_sync, *zip(*[(url, request, c, t, timeout_s, headers)
                                                 for c, t in shares if c and t])))
    merged = LoadResult(wall_s=max(p.wall_s for p in parts))
    for part in parts:
        merged.latencies_s += part.latencies_s
        merged.statuses += part.statuses
        merged.errors += part.errors
        merged.retry_after += part.retry_after
    return merged


@dataclass(frozen=True)
class FeaturesRequest:
    """POST /features with one image (a class, not a closure, so client processes get it)."""

    image: bytes
    fields: tuple[tuple[str, str], ...] = ()
    params: tuple[tuple[str, str], ...] = ()

    def __call__(self, client: httpx.AsyncClient):
        return client.post("/features", files={"image": ("image.jpg", self.image)},
                           data=dict(self.fields), params=dict(self.params))


def features_request(image: bytes, params: dict[str, str] | None = None,
                     **fields: str) -> FeaturesRequest:
    return FeaturesRequest(image, tuple(fields.items()), tuple((params or {}).items()))
