"""Two models in one deployment: does a flood on one delay the other? Each model has its
own queue and its own worker, so model B's latency should not notice A's backlog."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from cleandift.demo import ensure_model
from cleandift.settings import Settings

from .load import FeaturesRequest, LoadResult, features_request, run_load
from .stack import service_stack

FLEET_DESCRIPTIONS = {
    "fleet_p95_ms_quiet": "model B's p95 latency, model A idle (ms)",
    "fleet_p95_ms_flooded": "model B's p95 latency while model A has a flood queued (ms)",
    "fleet_flooded_vs_quiet": "B's p95 flooded / quiet (want <= 1.5)",
    "fleet_flood_queued": "model A's requests queued when B's measurement began",
    "fleet_flood_queued_after": "model A's requests queued when it ended",
}


def fleet_figures(jpeg: bytes, quick: bool, flood: int = 200) -> dict[str, float]:
    """B's latency alone, then with `flood` requests of A queued; one worker per model,
    one CPU thread each (2 cores: one each)."""
    cache = Settings().cache_dir
    a, b = ensure_model("demo", cache), ensure_model("demo15", cache)
    n = 20 if quick else 40
    envs = [{"CLEANDIFT_MODEL": str(a), "CLEANDIFT_MODEL_NAME": "a"},
            {"CLEANDIFT_MODEL": str(b), "CLEANDIFT_MODEL_NAME": "b"}]
    with service_stack(str(a), worker_envs=envs, models="a,b", torch_threads="1",
                       max_queue=str(flood + 64), request_timeout_s="600",
                       result_ttl_s="600") as stack:
        for_b = features_request(jpeg, params={"model": "b"})
        run_load(stack.url, for_b, concurrency=1, total=5)  # warm-up
        quiet = run_load(stack.url, for_b, concurrency=1, total=n)
        stop = threading.Event()
        flooding = threading.Thread(target=_flood, args=(
            stack.url, features_request(jpeg, params={"model": "a"}), flood, stop))
        flooding.start()
        try:
            queued = _wait_queued(stack.url, "a", flood * 3 // 4)
            flooded = run_load(stack.url, for_b, concurrency=1, total=n)
            still = _queued(stack.url, "a")
        finally:
            stop.set()
            flooding.join()
    _check(quiet, n)
    _check(flooded, n)
    if still < flood // 2:
        raise RuntimeError(f"A's backlog fell to {still} during B's measurement")
    return {"fleet_p95_ms_quiet": quiet.percentile_ms(95),
            "fleet_p95_ms_flooded": flooded.percentile_ms(95),
            "fleet_flooded_vs_quiet": flooded.percentile_ms(95) / quiet.percentile_ms(95),
            "fleet_flood_queued": queued, "fleet_flood_queued_after": still}


def _flood(url: str, request: FeaturesRequest, in_flight: int, stop: threading.Event
           ) -> None:
    """Keep `in_flight` requests of one model waiting until `stop`: a backlog that stays."""

    async def run() -> None:
        limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

            async def user() -> None:
                while not stop.is_set():
                    await request(client)

            await asyncio.gather(*(user() for _ in range(in_flight)))

    asyncio.run(run())


def _queued(url: str, model: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "cleandift_queue_depth" and sample.labels.get("model") == model)


def _wait_queued(url: str, model: str, at_least: int, timeout_s: float = 60) -> float:
    deadline = time.monotonic() + timeout_s
    while (depth := _queued(url, model)) < at_least:
        if time.monotonic() > deadline:
            raise RuntimeError(f"model {model}'s queue never reached {at_least} ({depth})")
        time.sleep(0.1)
    return depth


def _check(result: LoadResult, n: int) -> None:
    if result.ok != n:
        raise RuntimeError(f"model B's requests failed: {set(result.statuses)} "
                           f"{result.errors[:2]}")
