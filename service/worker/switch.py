"""Versions switch as one: a model's workers all load a new version beside the old, then
one atomic write makes it the fleet's live version.

Redis keys (per model, service/queue/keys.py): `live` names the version the fleet
serves; `staged` maps each worker to the version it holds ready (`!V`: it failed to load
V). A worker reads `live` after every claim and runs that batch with that version, so
once any worker has answered with V (which it can only do after `live` became V), every
job claimed later is answered with V too. The last worker to stage V flips `live`; a
worker that failed V does not hold the switch back (it stops claiming instead), a worker
that died drops out with its heartbeat, and after `switch_timeout_s` the workers that
have V switch without those still loading. docs/reload.md tells the whole protocol.
"""

from __future__ import annotations

import contextlib
import logging
import time

import redis

from ..queue.connect import REDIS_ERRORS, Script
from ..queue.errors import QueueUnavailable
from ..queue.keys import Keys

log = logging.getLogger(__name__)
FAILED = "!"

# KEYS: workers (zset of heartbeats), staged (hash), live. ARGV: version, heartbeat cutoff,
# force ("1": skip the wait for live workers still loading), the live version the caller
# saw when it staged (a flip never overwrites a switch it did not know of).
_FLIP = """
local current = redis.call('GET', KEYS[3])
if current == ARGV[1] then return 1 end
if current and current ~= ARGV[4] then return 0 end
if ARGV[3] ~= '1' then
  for _, worker in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], '+inf')) do
    local staged = redis.call('HGET', KEYS[2], worker)
    if staged ~= ARGV[1] and staged ~= ('!' .. ARGV[1]) then return 0 end
  end
end
redis.call('SET', KEYS[3], ARGV[1])
return 1
"""


def live_version(client: redis.Redis, keys: Keys) -> str | None:
    value = client.get(keys.live)
    return value.decode() if isinstance(value, bytes) else value


class FleetSwitch:
    """One worker's side of the switch; every call may raise QueueUnavailable."""

    def __init__(self, client: redis.Redis, keys: Keys, worker_id: str, worker_ttl_s: float,
                 timeout_s: float) -> None:
        self.r, self.keys, self.worker_id = client, keys, worker_id
        self.worker_ttl_s, self.timeout_s = worker_ttl_s, timeout_s
        self._flip = Script(client, _FLIP)
        self._staged: tuple[str, float] | None = None  # the version held ready, since when
        self._seen: str | None = None  # the live version this worker read last

    def live(self, serving: str) -> str:
        """The fleet's live version. The first worker makes it the version it serves;
        after Redis lost its keys, a worker restores the live version it read last (not
        the one it serves: one that lags behind must never set the fleet back)."""
        proposal = self._seen or serving
        try:
            pipe = self.r.pipeline(transaction=False)  # one round trip: it runs per claim
            pipe.set(self.keys.live, proposal, nx=True)
            pipe.get(self.keys.live)
            value = pipe.execute()[1]
        except REDIS_ERRORS as exc:
            raise QueueUnavailable(str(exc)) from exc
        self._seen = (value.decode() if isinstance(value, bytes) else value) or proposal
        return self._seen

    def stage(self, version: str, serving: str) -> bool:
        """This worker holds `version` ready; True when the fleet now serves it."""
        try:
            before = self.live(serving)
            if self._staged is None or self._staged[0] != version:
                self._staged = (version, time.monotonic())
            self.r.hset(self.keys.staged, self.worker_id, version)
            return self._try_flip(before)
        except REDIS_ERRORS as exc:
            raise QueueUnavailable(str(exc)) from exc

    def failed(self, version: str) -> None:
        """This worker cannot load `version`: the others switch without it."""
        try:
            self.r.hset(self.keys.staged, self.worker_id, FAILED + version)
        except REDIS_ERRORS as exc:
            raise QueueUnavailable(str(exc)) from exc

    def _try_flip(self, before: str) -> bool:
        assert self._staged is not None
        version, since = self._staged
        force = time.monotonic() - since > self.timeout_s
        cutoff = time.time() - self.worker_ttl_s
        flipped = bool(self._flip(keys=[self.keys.workers, self.keys.staged, self.keys.live],
                                  args=[version, cutoff, "1" if force else "0", before]))
        if flipped and before != version:
            log.info("the fleet of %s now serves %s (was %s)%s", self.keys.ns, version, before,
                     " without the workers still loading it" if force else "")
        return flipped

    def leave(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            self.r.hdel(self.keys.staged, self.worker_id)
