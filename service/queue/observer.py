"""What the API knows of its queue without changing it: live workers, depth, the model
the workers serve, and whether Redis restarted (a new run id, maybe empty).

`JobProducer` builds on this: its monitor task calls `look()` every MONITOR_S so that
admission decides from the last look without a Redis round trip, and it resubmits the
waiting jobs when a look finds a restarted Redis. Reads only: nothing here enqueues,
answers or deletes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
from pydantic import ValidationError

from cleandift.contract import ModelInfo

from ..messages import UPLOADS_VERSION, Heartbeat
from .connect import ASYNC_REDIS_ERRORS, redis_errors
from .keys import Keys

log = logging.getLogger(__name__)

MODEL_CACHE_S = 1.0
PROTOCOLS_S = 5.0  # the live workers' job formats are read again at least this often


@dataclass
class QueueView:
    """What the monitor saw last: enough to admit or refuse a request without Redis."""

    reachable: bool = True
    live_workers: int = 1  # optimistic until the first look
    depth: int = 0
    run_id: str = ""
    epoch: int = 0  # bumped when Redis restarted (a new run_id)
    no_worker_since: float | None = None
    restarted_at: float | None = None  # monotonic time a new Redis run was first seen
    # Every live worker reads jobs that carry uploads (v4): the API need not decode.
    workers_decode: bool = False
    seen_at: float = field(default_factory=time.monotonic)


class QueueObserver:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, worker_ttl_s: float) -> None:
        self.r, self.keys, self.worker_ttl_s = client, keys, worker_ttl_s
        self.view = QueueView()
        self._model: tuple[float, ModelInfo | None] = (0.0, None)
        self._members: frozenset[bytes] = frozenset()  # the live workers seen last
        self._members_at = 0.0

    async def look(self) -> bool:
        """Refresh the view; True when Redis restarted since the last look."""
        since = time.time() - self.worker_ttl_s
        async with redis_errors():
            pipe = self.r.pipeline(transaction=False)
            pipe.zrangebyscore(self.keys.workers, since, "+inf")
            pipe.xlen(self.keys.jobs)
            members, depth = await pipe.execute()
            run_id = await self._run_id()
            live = len(members)
            await self._look_at_workers(frozenset(members))
        view = self.view
        restarted = bool(view.run_id) and run_id != view.run_id
        if restarted:
            view.epoch += 1
            log.warning("Redis restarted (run id %s): waiting requests are checked", run_id[:8])
            view.restarted_at, view.no_worker_since = time.monotonic(), None
        view.run_id, view.reachable = run_id, True
        view.live_workers, view.depth = int(live), int(depth)
        now = time.monotonic()
        # An empty Redis knows no worker until each heartbeats again (a period plus its
        # reconnection): only after worker_ttl_s does "none registered" mean "none alive".
        registering = view.restarted_at is not None and now - view.restarted_at < self.worker_ttl_s
        if live or registering:
            view.no_worker_since = None
        else:
            view.no_worker_since = view.no_worker_since or now
        view.seen_at = now
        return restarted

    async def _run_id(self) -> str:
        """The run id of the server holding this queue's stream (in a cluster, the node
        that owns its slot): a new one means it restarted, maybe empty."""
        if isinstance(self.r, aiocluster.RedisCluster):
            node = self.r.get_node_from_key(self.keys.jobs)
            return str((await self.r.info("server", target_nodes=node))["run_id"])
        return str((await self.r.info("server"))["run_id"])

    async def _look_at_workers(self, members: frozenset[bytes]) -> None:
        """Whether every live worker decodes uploads: read from their heartbeats when the
        set of workers changes (a worker's version changes only with its id's restart,
        which a heartbeat refresh notices within PROTOCOLS_S)."""
        now = time.monotonic()
        if members == self._members and now - self._members_at < PROTOCOLS_S:
            return
        beats = await self.r.mget([self.keys.worker(text(m)) for m in members]) if members else []
        parsed = [_parse(Heartbeat, raw) for raw in beats if raw]
        self.view.workers_decode = bool(parsed) and all(
            beat is not None and UPLOADS_VERSION in beat.protocols for beat in parsed)
        self._members, self._members_at = members, now

    def decode_here(self, decode_at: str) -> bool:
        """Whether the API decodes this request's images (docs/scale.md)."""
        return decode_at == "api" or not self.view.workers_decode

    async def ping(self) -> bool:
        try:
            return bool(await self.r.ping())
        except ASYNC_REDIS_ERRORS:
            return False

    async def live_workers(self) -> list[str]:
        since = time.time() - self.worker_ttl_s
        async with redis_errors():
            members = await self.r.zrangebyscore(self.keys.workers, since, "+inf")
        return [text(m) for m in members]

    async def heartbeats(self) -> list[Heartbeat]:
        """The latest heartbeat of each live worker."""
        workers = await self.live_workers()
        if not workers:
            return []
        async with redis_errors():
            beats = await self.r.mget([self.keys.worker(w) for w in workers])
        return [beat for raw in beats if raw and (beat := _parse(Heartbeat, raw)) is not None]

    async def queue_state(self) -> tuple[int, int]:
        """(jobs in the stream, jobs delivered but not acknowledged)."""
        async with redis_errors():
            depth = await self.r.xlen(self.keys.jobs)
            try:
                pending = (await self.r.xpending(self.keys.jobs, self.keys.group))["pending"]
            except redis.ResponseError:  # no group yet
                pending = 0
        return int(depth), int(pending)

    async def model_info(self, *, fresh: bool = False) -> ModelInfo | None:
        """What the workers serve (published on load and on every swap, before any answer
        of the new version), cached 1 s unless `fresh`; an answer of another version than
        the cached one invalidates the cache (`note_version`)."""
        fetched_at, info = self._model
        if not fresh and time.monotonic() - fetched_at < MODEL_CACHE_S and info is not None:
            return info
        async with redis_errors():
            raw = await self.r.get(self.keys.model)
        info = _parse(ModelInfo, raw) if raw else None
        self._model = (time.monotonic(), info)
        return info

    def note_version(self, version: str) -> None:
        """An answer from a version other than the cached one means a reload happened: the
        next model_info() reads Redis again, so /v1/models and ETags never lag an answer."""
        _, info = self._model
        if info is not None and version and version != info.version:
            self._model = (0.0, info)


M = TypeVar("M", ModelInfo, Heartbeat)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse(model: type[M], raw: bytes | str) -> M | None:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:  # written by a worker of another version: skip it
        log.warning("unreadable %s in Redis: %s", model.__name__, exc)
        return None
