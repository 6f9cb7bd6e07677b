"""The API's side of the queue: admission, bounded enqueue, awaiting answers.

One listener task per API process owns the reply channel and wakes the waiting requests;
a slow poll of the result key covers any notification lost while Redis reconnected. A
monitor task keeps what admission needs (live workers, queue depth: `QueueObserver`)
fresh and notices a Redis that restarted empty: the jobs it lost are submitted again from
the copies the waiting requests hold, so an accepted request is answered, not left to
time out. Every Redis failure leaves this class as a `QueueError`, so routes never see
redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from .. import tracing
from ..logs import request_id_var
from ..messages import Job, Result
from .connect import ASYNC_REDIS_ERRORS, Script, redis_errors
from .errors import ClientGone, NoAnswerByDeadline, NoLiveWorker, QueueFull, QueueUnavailable
from .keys import Keys
from .observer import QueueObserver, text

log = logging.getLogger(__name__)

# Refuse instead of enqueuing when the stream already holds `limit` jobs (atomic).
_BOUNDED_XADD = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
"""
RESULT_POLL_S = 1.0
MONITOR_S = 0.25
LISTENER_BACKOFF_S = 0.5
STOP_S = 5.0  # longest each step of a shutdown waits
WAKE_KEEP = 100  # wake-up calls kept at most (only the list's length matters)
WAKE_TTL_S = 600  # a call nobody answered in this long is forgotten


@dataclass
class _Waiter:
    job: Job
    entry: str
    epoch: int
    event: asyncio.Event = field(default_factory=asyncio.Event)


class JobProducer(QueueObserver):
    def __init__(
        self, client: aioredis.Redis, keys: Keys, *, max_queue: int, stream_maxlen: int,
        worker_ttl_s: float,
    ) -> None:
        super().__init__(client, keys, worker_ttl_s=worker_ttl_s)
        self.max_queue, self.stream_maxlen = max_queue, stream_maxlen
        self.api_id = uuid.uuid4().hex[:12]
        self.reply_channel = keys.replies(self.api_id)
        self._waiters: dict[str, _Waiter] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._xadd = Script(client, _BOUNDED_XADD)

    async def start(self) -> None:
        with contextlib.suppress(QueueUnavailable):
            await self._refresh()
        self._tasks = [asyncio.create_task(self._listen(), name="reply-listener"),
                       asyncio.create_task(self._monitor(), name="queue-monitor")]

    async def stop(self) -> None:
        """Bounded: a shutdown never hangs on a Redis connection that will not close
        (redis-py's close can wait on a transport forever, redis/redis-py#3941)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_S)
        try:
            await asyncio.wait_for(self.r.aclose(), STOP_S)
        except (asyncio.TimeoutError, *ASYNC_REDIS_ERRORS) as exc:  # type: ignore[misc]
            log.warning("closing the Redis client failed (%s); left to the process exit",
                        type(exc).__name__)

    # -- requests ---------------------------------------------------------------------
    async def admit(self) -> None:
        """Refuse at once what would wait in vain or overflow, before any decoding. The
        monitor's last look decides; a refusal is confirmed by a fresh look first."""
        view = self.view
        if view.reachable and view.live_workers > 0 and view.depth < self.max_queue:
            return
        await self._refresh()
        if self.view.live_workers == 0:
            await self._wake()
            raise NoLiveWorker
        if self.view.depth >= self.max_queue:
            raise QueueFull

    async def submit(self, job: Job, *, again: bool = False,
                     gone: Callable[[], Awaitable[bool]] | None = None) -> Result:
        """Enqueue and wait for the answer until the job's deadline. `again`: a job that
        was accepted before (its result was lost) is never refused for room. `gone()`
        (asked at each poll) says the client went away: the job is cancelled."""
        job.spec.reply_to = self.reply_channel
        job.spec.request_id = request_id_var.get()
        with tracing.span("enqueue", tracing.SpanKind.PRODUCER, **{
                "cleandift.job_id": job.spec.id, "messaging.system": "redis",
                "messaging.operation.type": "send",
                "messaging.destination.name": self.keys.jobs}):
            job.spec.trace = tracing.carrier()  # the worker's spans follow this send
            entry = await self._enqueue(job, bounded=not again)
        waiter = self._waiters[job.spec.id] = _Waiter(job, entry, self.view.epoch)
        try:
            with tracing.span("wait"):
                return await self._await(waiter, gone)
        finally:
            self._waiters.pop(job.spec.id, None)

    async def _enqueue(self, job: Job, *, bounded: bool) -> str:
        fields = job.to_fields()  # the oldest version that expresses it
        async with redis_errors():
            if not bounded:  # a job accepted before: never refused for room
                return text(await self.r.xadd(self.keys.jobs, fields,  # type: ignore[arg-type]
                                               maxlen=self.stream_maxlen, approximate=True))
            args: list[Any] = [self.max_queue, self.stream_maxlen]
            for name, value in fields.items():
                args.extend([name, value])
            entry = await self._xadd(keys=[self.keys.jobs], args=args)
        if entry is None:
            raise QueueFull
        return text(entry)

    async def _await(self, waiter: _Waiter, gone: Callable[[], Awaitable[bool]] | None
                     ) -> Result:
        """Wait while the deadline allows, with or without a live worker: an accepted job
        stays in Redis, and a restarted worker (or another) takes it (a restart under
        `serve` takes longer than any short grace). Only new requests are refused at once
        when no worker lives (`admit`)."""
        job_id, deadline = waiter.job.spec.id, waiter.job.spec.deadline
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                await self._drop(waiter)
                if self.view.no_worker_since is not None:
                    raise NoLiveWorker  # 503 with Retry-After: worth sending again later
                log.warning("job %s (entry %s of %s) had no answer by its deadline", job_id,
                            waiter.entry, self.keys.jobs)
                raise NoAnswerByDeadline
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter.event.wait(), timeout=min(RESULT_POLL_S, remaining))
            waiter.event.clear()
            result = await self._take_result(job_id)
            if result is not None:
                self.note_version(result.meta.model_version)
                return result
            if gone is not None and await gone():
                await self._cancel(waiter)
                raise ClientGone
            if waiter.epoch != self.view.epoch:
                await self._resubmit(waiter)

    async def _take_result(self, job_id: str) -> Result | None:
        """Read, then delete: a read whose reply was lost is simply retried (clients retry
        a command on a broken connection, and one read-and-delete step retried would
        find its result gone). Only this process waits for the job; the TTL removes a
        result whose delete failed."""
        key = self.keys.result(job_id)
        try:
            fields: dict[bytes, bytes] = await self.r.hgetall(key)  # type: ignore[assignment]
        except ASYNC_REDIS_ERRORS as exc:
            log.warning("reading result %s failed: %s", job_id, exc)
            return None
        if not fields:
            return None
        with contextlib.suppress(*ASYNC_REDIS_ERRORS):
            await self.r.delete(key)
        return Result.from_fields(fields)

    async def _resubmit(self, waiter: _Waiter) -> None:
        """After a Redis restart: submit again a job the new Redis does not have, or
        one a worker had taken: a server that restarted from its append-only file may
        have lost the last second of writes, its answer among them, while the entry came
        back as taken (nobody would run it again before the visibility timeout). Only a
        job still waiting to be taken is left as it is."""
        try:
            async with redis_errors():
                entry = waiter.entry
                exists = await self.r.xrange(self.keys.jobs, entry, entry)
                taken = bool(exists) and bool(await self.r.xpending_range(
                    self.keys.jobs, self.keys.group, entry, entry, 1))
            if not exists or taken:
                waiter.entry = await self._enqueue(waiter.job, bounded=False)
                if taken:  # the copy taken before stays answered, never run a third time
                    await self.r.xdel(self.keys.jobs, entry)
                log.warning("Redis restarted: job %s submitted again", waiter.job.spec.id)
            waiter.epoch = self.view.epoch
        except QueueUnavailable:
            pass  # Redis is still coming back: try again on the next poll

    async def _drop(self, waiter: _Waiter) -> None:
        """Take a job nobody will wait for out of the stream, so no worker runs it."""
        with contextlib.suppress(*ASYNC_REDIS_ERRORS):
            await self.r.xdel(self.keys.jobs, waiter.entry)

    async def _cancel(self, waiter: _Waiter) -> None:
        """Nobody waits any more: out of the stream if no worker took it yet, and marked
        cancelled (until its deadline) so a worker that did stops at its next stage."""
        await self._drop(waiter)
        job_id, left = waiter.job.spec.id, waiter.job.spec.deadline - time.time()
        with contextlib.suppress(*ASYNC_REDIS_ERRORS):
            await self.r.set(self.keys.cancelled(job_id), 1, ex=max(1, math.ceil(left)))
        log.info("job %s cancelled: its client went away", job_id)

    # -- background tasks -------------------------------------------------------------
    async def _listen(self) -> None:
        """Wake waiters on reply messages; reconnect forever with a short back-off. An
        outage is logged once (then at debug level until a subscribe works again), not at
        every retry of every API process."""
        warned = False
        while True:
            pubsub = self.r.pubsub(ignore_subscribe_messages=True)
            try:
                await self.r.ping()  # a cluster client learns its slots before a subscribe
                await pubsub.subscribe(self.reply_channel)
                if warned:
                    log.info("reply listener reconnected to Redis")
                warned = False
                async for message in pubsub.listen():
                    for job_id in text(message["data"]).split():  # several, from a cluster
                        waiter = self._waiters.get(job_id)
                        if waiter is not None:
                            waiter.event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection loss: waiters fall back to polling
                log.log(logging.DEBUG if warned else logging.WARNING,
                        "reply listener lost Redis (%s); reconnecting", exc)
                warned = True
                await asyncio.sleep(LISTENER_BACKOFF_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8

    async def _refresh(self) -> None:
        """A look; after a Redis restart every waiting request checks its job at once."""
        if await self.look():
            for waiter in list(self._waiters.values()):
                waiter.event.set()

    async def _monitor(self) -> None:
        while True:
            try:
                await self._refresh()
            except QueueUnavailable:
                self.view.reachable = False
            await asyncio.sleep(MONITOR_S)

    async def _wake(self) -> None:
        """Ask for workers (scaled to zero, or all dead): a bounded, expiring list."""
        async with redis_errors():
            pipe = self.r.pipeline(transaction=False)
            pipe.rpush(self.keys.wake, str(time.time()))
            pipe.ltrim(self.keys.wake, -WAKE_KEEP, -1)
            pipe.expire(self.keys.wake, WAKE_TTL_S)
            await pipe.execute()
