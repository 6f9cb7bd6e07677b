"""A real Redis (started by the suite unless REDIS_URL is set), a real uvicorn server and
real workers on the demo model. Each test gets its own queue prefix, so tests never see
each other's jobs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from cleandift.service.processes.redis_cluster import RedisCluster, start_redis_cluster
from cleandift.service.processes.redis_server import start_redis_server
from cleandift.settings import Settings
from tests.corpus import encode
from tests.service.service_helpers import running_service


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with start_redis_server() as server:
        yield server.url


@pytest.fixture
def redis_cluster() -> Iterator[RedisCluster]:
    """A private three-node Redis Cluster (its own per test: tests restart its nodes)."""
    with start_redis_cluster(3) as cluster:
        yield cluster


@pytest.fixture
def settings(redis_url, demo_dir, cache_dir) -> Settings:
    return Settings(redis_url=redis_url, model=str(demo_dir), cache_dir=cache_dir,
                    device="cpu", queue_prefix=f"test-{uuid.uuid4().hex[:8]}",
                    worker_port=0, request_timeout_s=30, heartbeat_s=0.2,
                    max_batch=8, inline_result_bytes=0,  # every feature result: direct
                    # Tests count forward passes of repeated images: the feature cache is
                    # off here and on in the tests about it (`cached_settings`).
                    feature_cache_bytes=0, feature_cache_shared_bytes=0)


@pytest.fixture
def cached_settings(settings) -> Settings:
    return settings.model_copy(update={"feature_cache_bytes": 64 << 20,
                                       "feature_cache_shared_bytes": 64 << 20})


@pytest.fixture(scope="module")
def jpeg(photo) -> bytes:
    return encode(photo, "JPEG", quality=92)


@pytest.fixture
def service(settings, extractor):
    with running_service(settings, extractor) as (client, threads):
        yield client

