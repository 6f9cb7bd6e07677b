"""Load above capacity sheds cleanly (200 or 429, never 5xx, nothing lost), and the
resident memory of the API and the worker stays flat over a bounded soak."""

from __future__ import annotations

import httpx
import pytest

from cleandift.bench.load import features_request, run_load
from cleandift.bench.stack import service_stack
from tests.reliability.helpers import IMAGE, rss_mib
from tests.service.service_helpers import metric, wait_metric

pytestmark = pytest.mark.integration


def test_overload_sheds_with_429_and_loses_nothing(demo_dir, record):
    with service_stack(str(demo_dir), max_queue="4", max_batch="2",
                       queue_prefix="overload") as stack:
        result = run_load(stack.url, features_request(IMAGE), concurrency=24, total=144)
        client = httpx.Client(base_url=stack.url)
        accepted = metric(client.get("/metrics").text, "cleandift_requests_total",
                          route="/features", status="200")
        # Worker figures reach the API with each heartbeat (every 2 s).
        text = wait_metric(client, "cleandift_images_processed_total", accepted)
    counts = {s: result.statuses.count(s) for s in set(result.statuses)}
    assert result.errors == [] and len(result.statuses) == 144
    assert set(counts) <= {200, 429} and counts.get(429, 0) > 0 and counts.get(200, 0) > 0
    assert set(result.retry_after) == {"1"}
    processed = metric(text, "cleandift_images_processed_total")
    assert accepted == processed == counts[200]  # every accepted job ran once, none lost
    record(fault="overload: 24 clients, queue bound 4", sent=144, succeeded=counts.get(200, 0),
           refused=counts.get(429, 0), errors=0, lost=0,
           notes=f"only 200 and 429 (Retry-After: 1); accepted {accepted:.0f} = processed "
                 f"{processed:.0f}; p95 {result.percentile_ms(95):.0f} ms")


SOAK_ROUND = 56  # requests per round: 168 after the warm-up round


def test_memory_is_flat_over_a_soak(demo_dir, record):
    with service_stack(str(demo_dir), max_batch="4", queue_prefix="soak") as stack:
        pids = {"api": stack.api.pid, "worker": stack.workers[0].pid}
        rounds = []
        for _ in range(4):
            result = run_load(stack.url, features_request(IMAGE, layers="us6,us9", size="128"),
                              concurrency=8, total=SOAK_ROUND)
            assert result.statuses == [200] * SOAK_ROUND
            rounds.append({name: rss_mib(pid) for name, pid in pids.items()})
    growth = {name: rounds[-1][name] - rounds[1][name] for name in pids}
    for name in pids:  # after warm-up (round 1), 3 more rounds
        assert growth[name] < max(40.0, 0.15 * rounds[1][name]), (name, rounds)
    record(fault=f"soak: 4 x {SOAK_ROUND} requests, 8 clients", sent=4 * SOAK_ROUND,
           succeeded=4 * SOAK_ROUND, refused=0,
           errors=0, lost=0, notes="RSS MiB after rounds 2 and 4: " + ", ".join(
               f"{n} {rounds[1][n]:.0f} -> {rounds[-1][n]:.0f}" for n in pids))
