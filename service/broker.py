"""The API's side of the queue: bounded enqueue, awaiting answers, reading queue state.

One listener task per API process owns the reply channel and wakes the waiting requests;
a slow poll of the result key covers any notification lost while Redis reconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

import redis
import redis.asyncio as aioredis

from .protocol import Job, Keys, Result

log = logging.getLogger(__name__)

# Refuse instead of enqueuing when the stream already holds `limit` jobs (atomic).
_BOUNDED_XADD = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
"""
RESULT_POLL_S = 1.0
MODEL_CACHE_S = 1.0


class QueueFull(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


class QueueUnavailable(Exception):
    pass


class Broker:
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
        self._listener: asyncio.Task | None = None
        self._xadd = client.register_script(_BOUNDED_XADD)
        self._model: tuple[float, dict | None] = (0.0, None)

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
            fields = job.to_fields()
            args = [self.max_queue, self.stream_maxlen]
            for name, value in fields.items():
                args.extend([name, value])
            try:
                entry = await self._xadd(keys=[self.keys.jobs], args=args)
            except redis.RedisError as exc:
                raise QueueUnavailable(str(exc)) from exc
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
                    event = self._waiters.get(message["data"].decode())
                    if event is not None:
                        event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection loss: waiters fall back to polling
                log.warning("reply listener lost Redis (%s); reconnecting", exc)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    # -- state ------------------------------------------------------------------------
    async def ping(self) -> bool:
        try:
            return bool(await self.r.ping())
        except redis.RedisError:
            return False

    async def live_workers(self) -> list[str]:
        since = time.time() - self.worker_ttl_s
        members = await self.r.zrangebyscore(self.keys.workers, since, "+inf")
        return [m.decode() for m in members]

    async def worker_snapshots(self) -> dict[str, str]:
        """Each live worker's latest metrics text, from its heartbeat."""
        workers = await self.live_workers()
        if not workers:
            return {}
        beats = await self.r.mget([self.keys.worker(w) for w in workers])
        return {w: json.loads(b).get("metrics", "") for w, b in zip(workers, beats) if b}

    async def queue_state(self) -> tuple[int, int]:
        """(jobs in the stream, jobs delivered but not acknowledged)."""
        depth = await self.r.xlen(self.keys.jobs)
        try:
            pending = (await self.r.xpending(self.keys.jobs, self.keys.group))["pending"]
        except redis.ResponseError:  # no group yet
            pending = 0
        return int(depth), int(pending)

    async def model_info(self) -> dict | None:
        """What the workers serve (published on load and on every swap), cached 1 s."""
        fetched_at, info = self._model
        if time.monotonic() - fetched_at < MODEL_CACHE_S and info is not None:
            return info
        raw = await self.r.get(self.keys.model)
        info = json.loads(raw) if raw else None
        self._model = (time.monotonic(), info)
        return info
