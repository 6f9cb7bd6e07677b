"""The API's view of the queue (QueueObserver, run by JobProducer's monitor)."""

from __future__ import annotations

import asyncio
import time

import pytest

from cleandift.service.queue import observer
from cleandift.service.queue import producer as producer_module
from cleandift.service.queue.connect import async_client
from cleandift.service.queue.keys import Keys

pytestmark = pytest.mark.integration  # a real Redis


def test_after_an_empty_redis_restart_workers_get_time_to_register(settings, monkeypatch):
    """A new Redis knows no worker until each heartbeats again: for worker_ttl_s that is
    not "no worker alive" (waiting requests would get 503 from a healthy fleet)."""
    async def scenario() -> list[float | None]:
        producer = producer_module.JobProducer(
            async_client(settings.redis_url), Keys(settings.queue_prefix), max_queue=8,
            stream_maxlen=1000, worker_ttl_s=10)
        producer.view.run_id = "a-redis-that-is-gone"  # as if Redis had restarted
        seen = []
        await producer.look()
        seen.append(producer.view.no_worker_since)
        later = time.monotonic() + 11
        monkeypatch.setattr(observer.time, "monotonic", lambda: later)
        await producer.look()
        seen.append(producer.view.no_worker_since)
        await producer.r.aclose()
        return seen

    during, after = asyncio.run(scenario())
    assert during is None and after is not None
