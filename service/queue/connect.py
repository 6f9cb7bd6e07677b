"""Redis clients, made in one place so every process reconnects the same way.

redis-py's `from_url` gives connections that never retry: after Redis restarts, the
first command on each pooled (now dead) connection fails. These clients retry connection
errors a few times with a short back-off, which lands them on a fresh connection.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

RETRIES = 3
ERRORS = [redis.ConnectionError, redis.TimeoutError]


def async_client(url: str, *, socket_timeout: float = 10.0) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url, socket_connect_timeout=2, socket_timeout=socket_timeout, health_check_interval=10,
        retry=AsyncRetry(ExponentialBackoff(cap=0.5, base=0.02), RETRIES), retry_on_error=ERRORS)


def sync_client(url: str, *, socket_timeout: float = 30.0) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_connect_timeout=2, socket_timeout=socket_timeout, health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), RETRIES), retry_on_error=ERRORS)
