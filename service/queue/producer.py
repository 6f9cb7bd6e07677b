"""The API's side of the queue: admission, bounded enqueue, awaiting answers, queue state.

One listener task per API process owns the reply channel and wakes the waiting requests;
a slow poll of the result key covers any notification lost while Redis reconnected. A
monitor task keeps what admission needs (live workers, queue depth) fresh and notices a
Redis that restarted empty: the jobs it lost are submitted again from the copies the
waiting requests hold, so an accepted request is answered, not left to time out.
Every Redis failure leaves this class as a `QueueError`, so routes never see redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
from pydantic import ValidationError

from cleandift.contract import ModelInfo

from .. import tracing
from ..logs import request_id_var
from ..messages import UPLOADS_VERSION, Heartbeat, Job, Result
from .connect import ASYNC_REDIS_ERRORS, Script
from .errors import ClientGone, NoAnswerByDeadline, NoLiveWorker, QueueFull, QueueUnavailable
from .keys import Keys

log = logging.getLogger(__name__)

# Refuse instead of enqueuing when the stream already holds `limit` jobs (atomic).
_BOUNDED_XADD = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
"""
RESULT_POLL_S = 1.0
MODEL_CACHE_S = 1.0
MONITOR_S = 0.25
LISTENER_BACKOFF_S = 0.5
PROTOCOLS_S = 5.0  # the live workers' job formats are read again at least this often
STOP_S = 5.0  # longest each step of a shutdown waits
WAKE_KEEP = 100  # wake-up calls kept at most (only the list's length matters)
WAKE_TTL_S = 600  # a call nobody answered in this long is forgotten


@contextlib.asynccontextmanager
async def _redis_errors() -> AsyncIterator[None]:
    try:
        yield
    except ASYNC_REDIS_ERRORS as exc:
        raise QueueUnavailable(str(exc)) from exc


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


@dataclass
class _Waiter:
    job: Job
    entry: str
    epoch: int
    event: asyncio.Event = field(default_factory=asyncio.Event)


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
        self.view = QueueView()
        self._waiters: dict[str, _Waiter] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._xadd = Script(client, _BOUNDED_XADD)
        self._model: tuple[float, ModelInfo | None] = (0.0, None)
        self._members: frozenset[bytes] = frozenset()  # the live workers seen last
        self._members_at = 0.0

    async def start(self) -> None:
        with contextlib.suppress(QueueUnavailable):
            await self._look()
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
        await self._look()
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
        async with _redis_errors():
            if not bounded:  # a job accepted before: never refused for room
                return _text(await self.r.xadd(self.keys.jobs, fields,  # type: ignore[arg-type]
                                               maxlen=self.stream_maxlen, approximate=True))
            args: list[Any] = [self.max_queue, self.stream_maxlen]
            for name, value in fields.items():
                args.extend([name, value])
            entry = await self._xadd(keys=[self.keys.jobs], args=args)
        if entry is None:
            raise QueueFull
        return _text(entry)

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
                self._note_version(result.meta.model_version)
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
            async with _redis_errors():
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
                    for job_id in _text(message["data"]).split():  # several, from a cluster
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

    async def _monitor(self) -> None:
        while True:
            try:
                await self._look()
            except QueueUnavailable:
                self.view.reachable = False
            await asyncio.sleep(MONITOR_S)

    async def _wake(self) -> None:
        """Ask for workers (scaled to zero, or all dead): a bounded, expiring list."""
        async with _redis_errors():
            pipe = self.r.pipeline(transaction=False)
            pipe.rpush(self.keys.wake, str(time.time()))
            pipe.ltrim(self.keys.wake, -WAKE_KEEP, -1)
            pipe.expire(self.keys.wake, WAKE_TTL_S)
            await pipe.execute()

    async def _look(self) -> None:
        since = time.time() - self.worker_ttl_s
        async with _redis_errors():
            pipe = self.r.pipeline(transaction=False)
            pipe.zrangebyscore(self.keys.workers, since, "+inf")
            pipe.xlen(self.keys.jobs)
            members, depth = await pipe.execute()
            run_id = await self._run_id()
            live = len(members)
            await self._look_at_workers(frozenset(members))
        view = self.view
        if view.run_id and run_id != view.run_id:
            view.epoch += 1
            log.warning("Redis restarted (run id %s): waiting requests are checked", run_id[:8])
            for waiter in list(self._waiters.values()):
                waiter.event.set()
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
        beats = await self.r.mget([self.keys.worker(_text(m)) for m in members]) if members else []
        parsed = [_parse(Heartbeat, raw) for raw in beats if raw]
        self.view.workers_decode = bool(parsed) and all(
            beat is not None and UPLOADS_VERSION in beat.protocols for beat in parsed)
        self._members, self._members_at = members, now

    def decode_here(self, decode_at: str) -> bool:
        """Whether the API decodes this request's images (docs/scale.md)."""
        return decode_at == "api" or not self.view.workers_decode

    # -- state ------------------------------------------------------------------------
    async def ping(self) -> bool:
        try:
            return bool(await self.r.ping())
        except ASYNC_REDIS_ERRORS:
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

    async def model_info(self, *, fresh: bool = False) -> ModelInfo | None:
        """What the workers serve (published on load and on every swap, before any answer
        of the new version), cached 1 s unless `fresh`; an answer of another version than
        the cached one invalidates the cache (`_note_version`)."""
        fetched_at, info = self._model
        if not fresh and time.monotonic() - fetched_at < MODEL_CACHE_S and info is not None:
            return info
        async with _redis_errors():
            raw = await self.r.get(self.keys.model)
        info = _parse(ModelInfo, raw) if raw else None
        self._model = (time.monotonic(), info)
        return info

    def _note_version(self, version: str) -> None:
        """An answer from a version other than the cached one means a reload happened: the
        next model_info() reads Redis again, so /v1/models and ETags never lag an answer."""
        _, info = self._model
        if info is not None and version and version != info.version:
            self._model = (0.0, info)


M = TypeVar("M", ModelInfo, Heartbeat)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse(model: type[M], raw: bytes | str) -> M | None:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:  # written by a worker of another version: skip it
        log.warning("unreadable %s in Redis: %s", model.__name__, exc)
        return None
