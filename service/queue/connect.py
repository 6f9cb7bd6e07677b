"""Redis clients, made in one place so every process reconnects the same way.

redis-py's `from_url` gives connections that never retry: after Redis restarts, the
first command on each pooled (now dead) connection fails. These clients retry connection
errors a few times with a short back-off, which lands them on a fresh connection. With
`cluster`, the URL names any node of a Redis Cluster and the client follows its slots
(MOVED, a node that restarted) the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from cleandift.settings import Settings

from .errors import QueueUnavailable
from .keys import Keys

RETRIES = 3
ERRORS = [redis.ConnectionError, redis.TimeoutError]
# What a Redis call can raise when the server (or a cluster node) is away or refuses:
# a cluster client's routing errors are not RedisErrors (a slot not covered while its
# node restarts, say).
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException, OSError)
# An asyncio client's write on a connection the server closed (a node restart) leaks the
# transport's own AttributeError/TypeError instead of ConnectionError (redis/redis-py#4287,
# 8.1.0): around an asyncio client's Redis calls only, those mean the same.
ASYNC_REDIS_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, AttributeError, TypeError)


@contextlib.asynccontextmanager
async def redis_errors() -> AsyncIterator[None]:
    """Every Redis failure leaves the API's side of the queue as `QueueUnavailable`, so
    routes never see redis-py."""
    try:
        yield
    except ASYNC_REDIS_ERRORS as exc:
        raise QueueUnavailable(str(exc)) from exc


def async_client(url: str, *, socket_timeout: float = 10.0, cluster: bool = False
                 ) -> aioredis.Redis:
    common: dict[str, Any] = dict(socket_connect_timeout=2, socket_timeout=socket_timeout,
                                  retry=AsyncRetry(ExponentialBackoff(cap=0.5, base=0.02),
                                                   RETRIES))
    if cluster:  # duck-types as a client for every command the service sends
        return aiocluster.RedisCluster.from_url(url, **common)  # type: ignore[return-value]
    return aioredis.Redis.from_url(url, health_check_interval=10, retry_on_error=ERRORS,
                                   **common)


def sync_client(url: str, *, socket_timeout: float = 30.0, cluster: bool = False
                ) -> redis.Redis:
    common: dict[str, Any] = dict(socket_connect_timeout=2, socket_timeout=socket_timeout,
                                  retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), RETRIES))
    if cluster:
        return redis.cluster.RedisCluster.from_url(url, **common)  # type: ignore[return-value]
    return redis.Redis.from_url(url, health_check_interval=10, retry_on_error=ERRORS, **common)


class Script:
    """A Lua script sent whole with EVAL on every call, instead of redis-py's cached
    EVALSHA: a node that restarted has forgotten every script, and a cluster client's
    reload path (SCRIPT LOAD to all nodes) fails on the connections the restart broke.
    The scripts here are a few hundred bytes; the jobs they carry are far larger.
    Called like a registered script; returns an awaitable for an asyncio client."""

    def __init__(self, client: Any, text: str) -> None:
        self.client, self.text = client, text

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        return self.client.eval(self.text, len(keys), *keys, *args)


def queue_keys(settings: Settings, served: str | None = None) -> Keys:
    """A model's keys as this deployment names them (prefix, cluster hash tags)."""
    return Keys(settings.queue_prefix, served, cluster=settings.redis_cluster)
