"""The worker's side of the Redis Streams queue: claim, reclaim, answer, heartbeat.

At-least-once: an entry is acknowledged (and deleted) only after its result is stored.
Entries left pending by a dead worker are reclaimed with XAUTOCLAIM after the visibility
timeout; past `max_deliveries` they go to the dead-letter stream and the client is told.

This class owns its Redis errors: a lost connection leaves it as `QueueUnavailable`, and
a Redis that restarted empty (no consumer group, no model key) is repaired here, once,
before the call is retried.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import redis
import redis.cluster

from ..messages import (
    READABLE_VERSIONS,
    Entry,
    Heartbeat,
    Job,
    Result,
    UnreadableJob,
    failure,
)
from .connect import REDIS_ERRORS
from .errors import QueueUnavailable
from .keys import Keys

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")
Answer = tuple[Job, Result]


def _owns_errors(method: Callable[P, T]) -> Callable[P, T]:
    """Connection errors become QueueUnavailable; a missing group is recreated and the
    call retried once."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        consumer: JobConsumer = args[0]  # type: ignore[assignment]
        try:
            try:
                return method(*args, **kwargs)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                consumer.recover()
                return method(*args, **kwargs)
        except REDIS_ERRORS as exc:
            raise QueueUnavailable(str(exc)) from exc

    return wrapper


class JobConsumer:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        consumer: str,
        *,
        visibility_timeout_s: float,
        max_deliveries: int,
        result_ttl_s: int,
        stream_maxlen: int,
        readable_versions: tuple[int, ...] = READABLE_VERSIONS,
    ) -> None:
        self.r, self.keys, self.consumer = client, keys, consumer
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.max_deliveries = max_deliveries
        self.result_ttl_s = result_ttl_s
        self.stream_maxlen = stream_maxlen
        self.readable_versions = readable_versions
        self.partition = keys.partition or 0
        self._model_json: str | None = None
        ensure_group(client, keys)

    def recover(self) -> None:
        """After Redis lost its data: recreate the consumer group, republish the model."""
        log.warning("the consumer group is gone (Redis restarted empty?): recreating it")
        ensure_group(self.r, self.keys)
        if self._model_json is not None:
            self.r.set(self.keys.model, self._model_json)

    @_owns_errors
    def claim(self, count: int, block_ms: int) -> list[Job]:
        """New jobs for this consumer; returns as soon as at least one is there (at once
        when `block_ms` is 0)."""
        reply = self._read(">", count, block_ms)
        entries = [(entry_id, fields) for _stream, batch in reply or [] for entry_id, fields
                   in batch if fields]
        return self._parse_all(entries)

    @_owns_errors
    def reclaim(self, count: int) -> tuple[list[Job], int]:
        """Jobs idle past the visibility timeout; returns (runnable jobs, dead-lettered)."""
        reply = self.r.xautoclaim(
            self.keys.jobs, self.keys.group, self.consumer, self.visibility_ms, "0-0", count
        )
        entries: list[Any] = reply[1]
        deleted: list[Any] = reply[2] if len(reply) > 2 else []
        for entry_id in deleted:  # pending entries whose data is gone: nothing to run
            self.r.xack(self.keys.jobs, self.keys.group, entry_id)
        return self._screen(self._parse_all([(entry_id, fields) for entry_id, fields in entries]))

    @_owns_errors
    def claim_own_pending(self, count: int, after: str = "0") -> tuple[list[Job], int, str]:
        """A page of the entries this consumer name already holds (after `after`): when a
        worker restarts under the same name (as `serve` restarts its workers), the jobs
        of its previous life, at once. Returns (jobs, dead-lettered, last id read)."""
        reply = self._read(after, count, 0)
        batch = [entry for _stream, entries in reply or [] for entry in entries]
        for entry_id, fields in batch:
            if not fields:  # deleted while pending: nothing to run
                self.r.xack(self.keys.jobs, self.keys.group, entry_id)
        jobs, dead = self._screen(self._parse_all([e for e in batch if e[1]]))
        return jobs, dead, _text(batch[-1][0]) if batch else ""

    def _screen(self, jobs: list[Job]) -> tuple[list[Job], int]:
        """(jobs to run, count dead-lettered after too many deliveries)."""
        if not jobs:
            return [], 0
        counts = self._delivery_counts([j.entry_id for j in jobs])
        runnable, dead = [], 0
        for job in jobs:
            job.deliveries = counts.get(job.entry_id, self.max_deliveries + 1)
            if job.deliveries > self.max_deliveries:
                self.dead_letter(job, f"gave up after {job.deliveries - 1} deliveries")
                dead += 1
            else:
                runnable.append(job)
        return runnable, dead

    @_owns_errors
    def complete(self, answers: Sequence[Answer]) -> None:
        """Store results, then acknowledge and delete the entries, then notify the APIs."""
        pipe = self.r.pipeline(transaction=False)
        for job, result in answers:
            key = self.keys.result(job.spec.id)
            pipe.delete(key)
            pipe.hset(key, mapping=result.to_fields())  # type: ignore[arg-type]
            pipe.expire(key, self.result_ttl_s)
        pipe.execute()
        self._acknowledge([(job.entry_id, job.spec.id, job.spec.reply_to) for job, _ in answers])

    @_owns_errors
    def cancelled(self, job_ids: Sequence[str]) -> set[str]:
        """Which of these jobs the API cancelled (their clients went away)."""
        if not job_ids:
            return set()
        found = self.r.mget([self.keys.cancelled(job_id) for job_id in job_ids])
        return {job_id for job_id, mark in zip(job_ids, found) if mark is not None}

    @_owns_errors
    def touch(self, entries: Sequence[Entry]) -> None:
        """Reset the idle time of entries this worker still works on, so that only a dead
        worker's jobs are ever reclaimed (JUSTID: the delivery count does not grow).
        Entries of other partitions are not this stream's."""
        ids: list[Any] = [entry for part, entry in entries if part == self.partition]
        if ids:
            self.r.xclaim(self.keys.jobs, self.keys.group, self.consumer, 0, ids, justid=True)

    @_owns_errors
    def dead_letter(self, job: Job, reason: str) -> None:
        log.warning("dead-lettering job %s: %s", job.spec.id, reason)
        record = {"job": job.spec.id, "entry": job.entry_id, "reason": reason,
                  "spec": job.spec.model_copy(update={"points": None}).model_dump_json()}
        self.r.xadd(self.keys.dead, record, maxlen=self.stream_maxlen,  # type: ignore[arg-type]
                    approximate=True)
        self.complete([(job, failure(job.spec.id, 500, f"the job failed: {reason}"))])

    @_owns_errors
    def heartbeat(self, beat: Heartbeat, ttl_s: float) -> None:
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self.keys.worker(self.consumer), beat.model_dump_json(), px=int(ttl_s * 1000))
        pipe.zadd(self.keys.workers, {self.consumer: now})
        pipe.zremrangebyscore(self.keys.workers, 0, now - 10 * ttl_s)
        pipe.delete(self.keys.wake)  # awake: the autoscaler's wake-up call is answered
        pipe.execute()

    @_owns_errors
    def leave(self) -> None:
        """Announce a clean exit so /readyz stops counting this worker at once."""
        remove_worker(self.r, self.keys, self.consumer)

    @_owns_errors
    def publish_model(self, info_json: str) -> None:
        self._model_json = info_json
        self.r.set(self.keys.model, info_json)

    def remember_model(self, info_json: str) -> None:
        """Published by another partition's consumer: kept to publish again (`recover`)."""
        self._model_json = info_json

    # -- helpers ----------------------------------------------------------------------
    def _read(self, after: str, count: int, block_ms: int) -> Any:
        """XREADGROUP of this stream. A cluster client is told the node: it cannot place
        XREADGROUP's keys itself and asks the server (COMMAND GETKEYS) before every read,
        which doubled the Redis CPU of a read (a moved slot fails this call, QueueUnavailable,
        and the next one goes to the new owner)."""
        if not isinstance(self.r, redis.cluster.RedisCluster):
            return self.r.xreadgroup(self.keys.group, self.consumer, {self.keys.jobs: after},
                                     count=count, block=block_ms or None)
        block = ["BLOCK", block_ms] if block_ms else []
        return self.r.execute_command(
            "XREADGROUP", "GROUP", self.keys.group, self.consumer, "COUNT", count, *block,
            "STREAMS", self.keys.jobs, after,
            target_nodes=self.r.get_node_from_key(self.keys.jobs))

    def _acknowledge(self, entries: list[tuple[str, str, str]]) -> None:
        """XACK + XDEL each (entry, job id, reply channel) and notify its API."""
        pipe = self.r.pipeline(transaction=False)
        for entry_id, _, _ in entries:
            pipe.xack(self.keys.jobs, self.keys.group, entry_id)
            pipe.xdel(self.keys.jobs, entry_id)
        notes = [(reply_to, job_id) for _, job_id, reply_to in entries if reply_to]
        if isinstance(self.r, redis.cluster.RedisCluster):
            # No PUBLISH in cluster pipelines, and a cluster sends every PUBLISH to every
            # node: one message per API carries all of its job ids (space-separated).
            pipe.execute()
            by_channel: dict[str, list[str]] = defaultdict(list)
            for channel, job_id in notes:
                by_channel[channel].append(job_id)
            for channel, job_ids in by_channel.items():
                self.r.publish(channel, " ".join(job_ids))
            return
        for channel, job_id in notes:
            pipe.publish(channel, job_id)
        pipe.execute()

    def _delivery_counts(self, entry_ids: list[str]) -> dict[str, int]:
        lo, hi = min(entry_ids, key=_order), max(entry_ids, key=_order)
        rows = self.r.xpending_range(
            self.keys.jobs, self.keys.group, lo, hi, len(entry_ids) * 4 + 10, self.consumer
        )
        return {_text(row["message_id"]): int(row["times_delivered"]) for row in rows}

    def _parse_all(self, entries: list[tuple[Any, Any]]) -> list[Job]:
        jobs = []
        for raw_id, fields in entries:
            entry_id = _text(raw_id)
            try:
                job = Job.from_fields(entry_id, fields, self.readable_versions)
            except UnreadableJob as exc:  # never let one bad entry wedge us, never drop it
                self._refuse(entry_id, exc)
                continue
            job.partition = self.partition
            jobs.append(job)
        return jobs

    def _refuse(self, entry_id: str, exc: UnreadableJob) -> None:
        """Answer an entry we cannot run (its client learns why at once), then drop it."""
        job_id, reply_to = exc.envelope["id"], exc.envelope["reply_to"]
        log.error("refusing entry %s (job %s): %s", entry_id, job_id or "?", exc)
        if job_id:
            key = self.keys.result(job_id)
            result = failure(job_id, exc.status, f"this worker cannot run the job: {exc}")
            self.r.hset(key, mapping=result.to_fields())  # type: ignore[arg-type]
            self.r.expire(key, self.result_ttl_s)
        self._acknowledge([(entry_id, job_id, reply_to if job_id else "")])


def remove_worker(client: redis.Redis, keys: Keys, worker_id: str) -> None:
    """Stop counting a worker as alive (its clean exit, or its supervisor seeing it die)."""
    pipe = client.pipeline(transaction=False)
    pipe.zrem(keys.workers, worker_id)
    pipe.delete(keys.worker(worker_id))
    pipe.hdel(keys.staged, worker_id)  # out of any version switch (worker/switch.py)
    pipe.execute()


def ensure_group(client: redis.Redis, keys: Keys) -> None:
    try:
        client.xgroup_create(keys.jobs, keys.group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _order(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)

