"""The API's side of the queue: bounded enqueue, awaiting answers, reading queue state.

One listener task per API process owns the reply channel and wakes the waiting requests;
a slow poll of the result key covers any notification lost while Redis reconnected.
Every Redis failure leaves this class as `QueueUnavailable`, so routes never see redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from pydantic import ValidationError

from cleandift.contract import ModelInfo

from ..messages import PROTOCOL_VERSION, Heartbeat, Job, Result
from .errors import DeadlineExceeded, QueueFull, QueueUnavailable
from .keys import Keys

log = logging.getLogger(__name__)

# Refuse instead of enqueuing when the stream already holds `limit` jobs (atomic).
_BOUNDED_XADD = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
"""
RESULT_POLL_S = 1.0
MODEL_CACHE_S = 1.0
LISTENER_BACKOFF_S = 0.5


@contextlib.asynccontextmanager
async def _redis_errors() -> AsyncIterator[None]:
    try:
        yield
    except (redis.RedisError, OSError) as exc:
        raise QueueUnavailable(str(exc)) from exc


class JobProducer:
    def __init__(
        self, client: aioredis.Redis, keys: Keys, *, max_queue: int, stream_maxlen: int,
        worker_ttl_s: float,
    ) -> None:
        self.r, self.keys = client, keys
        self.max_queue, self.stream_maxlen = max_queue, stream_maxlen
        self.worker_ttl_s = worker_ttl_s
        self.api_id = uuid.uuid4().hex[:12]
        self.reply_channel = keys.replies(self.api_id)
        self._waiters: dict[str, asyncio.Event] = {}
        self._listener: asyncio.Task[None] | None = None
        self._xadd = client.register_script(_BOUNDED_XADD)
        self._model: tuple[float, ModelInfo | None] = (0.0, None)

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="reply-listener")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self.r.aclose()

    # -- requests ---------------------------------------------------------------------
    async def submit(self, job: Job) -> Result:
        """Enqueue and wait for the answer until the job's deadline."""
        job.spec.reply_to = self.reply_channel
        event = self._waiters[job.spec.id] = asyncio.Event()
        try:
            args: list[bytes | str | int] = [self.max_queue, self.stream_maxlen]
            for name, value in job.to_fields(PROTOCOL_VERSION).items():
                args.extend([name, value])
            async with _redis_errors():
                entry = await self._xadd(keys=[self.keys.jobs], args=args)
            if entry is None:
                raise QueueFull
            return await self._await(job.spec.id, job.spec.deadline, event)
        finally:
            self._waiters.pop(job.spec.id, None)

    async def _await(self, job_id: str, deadline: float, event: asyncio.Event) -> Result:
        key = self.keys.result(job_id)
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise DeadlineExceeded
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=min(RESULT_POLL_S, remaining))
            event.clear()
            try:
                pipe = self.r.pipeline(transaction=True)
                pipe.hgetall(key)
                pipe.delete(key)
                fields, _ = await pipe.execute()
            except redis.RedisError as exc:
                log.warning("reading result %s failed: %s", job_id, exc)
                continue
            if fields:
                return Result.from_fields(fields)

    async def _listen(self) -> None:
        """Wake waiters on reply messages; reconnect forever with a short back-off."""
        while True:
            pubsub = self.r.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.reply_channel)
                async for message in pubsub.listen():
                    event = self._waiters.get(_text(message["data"]))
                    if event is not None:
                        event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection loss: waiters fall back to polling
                log.warning("reply listener lost Redis (%s); reconnecting", exc)
                await asyncio.sleep(LISTENER_BACKOFF_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    # -- state ------------------------------------------------------------------------
    async def ping(self) -> bool:
        try:
            return bool(await self.r.ping())
        except (redis.RedisError, OSError):
            return False

    async def live_workers(self) -> list[str]:
        since = time.time() - self.worker_ttl_s
        async with _redis_errors():
            members = await self.r.zrangebyscore(self.keys.workers, since, "+inf")
        return [_text(m) for m in members]

    async def heartbeats(self) -> list[Heartbeat]:
        """The latest heartbeat of each live worker."""
        workers = await self.live_workers()
        if not workers:
            return []
        async with _redis_errors():
            beats = await self.r.mget([self.keys.worker(w) for w in workers])
        return [beat for raw in beats if raw and (beat := _parse(Heartbeat, raw)) is not None]

    async def queue_state(self) -> tuple[int, int]:
        """(jobs in the stream, jobs delivered but not acknowledged)."""
        async with _redis_errors():
            depth = await self.r.xlen(self.keys.jobs)
            try:
                pending = (await self.r.xpending(self.keys.jobs, self.keys.group))["pending"]
            except redis.ResponseError:  # no group yet
                pending = 0
        return int(depth), int(pending)

    async def model_info(self) -> ModelInfo | None:
        """What the workers serve (published on load and on every swap), cached 1 s."""
        fetched_at, info = self._model
        if time.monotonic() - fetched_at < MODEL_CACHE_S and info is not None:
            return info
        async with _redis_errors():
            raw = await self.r.get(self.keys.model)
        info = _parse(ModelInfo, raw) if raw else None
        self._model = (time.monotonic(), info)
        return info


M = TypeVar("M", ModelInfo, Heartbeat)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse(model: type[M], raw: bytes | str) -> M | None:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:  # written by a worker of another version: skip it
        log.warning("unreadable %s in Redis: %s", model.__name__, exc)
        return None
