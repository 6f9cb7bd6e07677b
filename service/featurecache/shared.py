"""The feature cache's shared tier, in Redis, with its own byte budget and LRU order.

Each entry is one tensor (as a small safetensors blob) under `PREFIX:cache:KEY`. Beside
them: a sorted set of entries by last use, a hash of their sizes, the running total, and
one index set per model version so a reload can drop exactly that version's entries. The
scripts keep all of it consistent and evict the least recently used entries until the
total is within the budget: the cache never needs Redis' own eviction, which must stay
off (it could evict the job stream).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..queue.connect import REDIS_ERRORS, Script
from ..queue.errors import QueueUnavailable
from ..queue.keys import Keys

_PUT = """
local lru, sizes, total, base = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local budget, now = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
  local entry, value = ARGV[i], ARGV[i + 1]
  local old = tonumber(redis.call('HGET', sizes, entry) or '0')
  redis.call('SET', base .. entry, value)
  redis.call('HSET', sizes, entry, #value)
  redis.call('ZADD', lru, now, entry)
  redis.call('SADD', base .. 'index:' .. string.match(entry, '^[^|]*|[^|]*|'), entry)
  redis.call('INCRBY', total, #value - old)
end
while tonumber(redis.call('GET', total) or '0') > budget do
  local oldest = redis.call('ZPOPMIN', lru)
  if #oldest == 0 then break end
  local entry = oldest[1]
  redis.call('DECRBY', total, tonumber(redis.call('HGET', sizes, entry) or '0'))
  redis.call('HDEL', sizes, entry)
  redis.call('DEL', base .. entry)
  redis.call('SREM', base .. 'index:' .. string.match(entry, '^[^|]*|[^|]*|'), entry)
end
return redis.call('GET', total)
"""

_INVALIDATE = """
local lru, sizes, total, base, prefix = KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2]
local members = redis.call('SMEMBERS', base .. 'index:' .. prefix)
for _, entry in ipairs(members) do
  redis.call('DECRBY', total, tonumber(redis.call('HGET', sizes, entry) or '0'))
  redis.call('HDEL', sizes, entry)
  redis.call('ZREM', lru, entry)
  redis.call('DEL', base .. entry)
end
redis.call('DEL', base .. 'index:' .. prefix)
return #members
"""


def eviction_risk(client: redis.Redis) -> str | None:
    """Why storing cache entries here could make Redis evict the job stream, or None.

    With a memory limit and an `allkeys-*` policy, Redis picks victims among all keys, the
    stream included; a cache that adds bytes makes that likelier, so the shared tier stays
    off. Managed Redis often refuses CONFIG: then only our own budget protects the stream."""
    try:
        config = client.config_get("maxmemory*")
    except redis.ResponseError:
        return None
    except REDIS_ERRORS as exc:
        raise QueueUnavailable(str(exc)) from exc
    policy = str(config.get("maxmemory-policy", "noeviction"))
    if int(config.get("maxmemory", 0) or 0) and policy.startswith("allkeys"):
        return f"maxmemory-policy is {policy}: Redis may evict any key, the job stream included"
    return None


class SharedTier:
    def __init__(self, client: redis.Redis, keys: Keys, max_bytes: int) -> None:
        self.r, self.max_bytes = client, max_bytes
        self.base = keys.cache_base
        self._meta = [self.base + "lru", self.base + "sizes", self.base + "bytes"]
        self._put = Script(client, _PUT)
        self._invalidate = Script(client, _INVALIDATE)

    def get(self, keys: Sequence[str]) -> list[torch.Tensor | None]:
        if not keys:
            return []
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.mget([self.base + k for k in keys])
            pipe.zadd(self._meta[0], dict.fromkeys(keys, time.time()), xx=True)  # touch
            blobs, _ = pipe.execute()
        except REDIS_ERRORS as exc:
            raise QueueUnavailable(str(exc)) from exc
        return [load_tensors(blob)["t"] if blob else None for blob in blobs]

    def put(self, entries: dict[str, torch.Tensor]) -> None:
        args: list[Any] = [self.base, self.max_bytes, time.time()]
        for key, tensor in entries.items():
            args += [key, save_tensors({"t": tensor.contiguous()})]
        try:
            self._put(keys=self._meta, args=args)
        except REDIS_ERRORS as exc:
            raise QueueUnavailable(str(exc)) from exc

    def invalidate(self, prefix: str) -> int:
        try:
            return int(self._invalidate(keys=self._meta, args=[self.base, prefix]))
        except REDIS_ERRORS as exc:
            raise QueueUnavailable(str(exc)) from exc

    def used(self) -> int:
        try:
            return int(self.r.get(self._meta[2]) or 0)
        except REDIS_ERRORS as exc:
            raise QueueUnavailable(str(exc)) from exc
