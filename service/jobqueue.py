"""The worker's side of the Redis Streams queue: claim, reclaim, answer, heartbeat.

At-least-once: an entry is acknowledged (and deleted) only after its result is stored.
Entries left pending by a dead worker are reclaimed with XAUTOCLAIM after the visibility
timeout; past `max_deliveries` they go to the dead-letter stream and the client is told.
"""

from __future__ import annotations

import json
import logging
import time

import redis

from .protocol import Job, Keys, Result

log = logging.getLogger(__name__)


class JobQueue:
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
    ) -> None:
        self.r, self.keys, self.consumer = client, keys, consumer
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.max_deliveries = max_deliveries
        self.result_ttl_s = result_ttl_s
        self.stream_maxlen = stream_maxlen
        ensure_group(client, keys)

    def claim(self, count: int, block_ms: int) -> list[Job]:
        """New jobs for this consumer; returns as soon as at least one is there."""
        reply = self.r.xreadgroup(
            self.keys.group, self.consumer, {self.keys.jobs: ">"}, count=count, block=block_ms
        )
        jobs = []
        for _stream, entries in reply or []:
            jobs.extend(self._parse(entry_id, fields) for entry_id, fields in entries if fields)
        return [j for j in jobs if j is not None]

    def reclaim(self, count: int) -> tuple[list[Job], int]:
        """Jobs idle past the visibility timeout; returns (runnable jobs, dead-lettered)."""
        reply = self.r.xautoclaim(
            self.keys.jobs, self.keys.group, self.consumer, self.visibility_ms, "0-0", count
        )
        entries, deleted = reply[1], reply[2] if len(reply) > 2 else []
        for entry_id in deleted:  # pending entries whose data is gone: nothing to run
            self.r.xack(self.keys.jobs, self.keys.group, entry_id)
        jobs = [j for entry_id, fields in entries if (j := self._parse(entry_id, fields))]
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

    def complete(self, jobs_results: list[tuple[Job, Result]]) -> None:
        """Store results, then acknowledge and delete the entries, then notify the APIs."""
        pipe = self.r.pipeline(transaction=False)
        for job, result in jobs_results:
            key = self.keys.result(job.spec.id)
            pipe.delete(key)
            pipe.hset(key, mapping=result.to_fields())
            pipe.expire(key, self.result_ttl_s)
        pipe.execute()
        pipe = self.r.pipeline(transaction=False)
        for job, _ in jobs_results:
            pipe.xack(self.keys.jobs, self.keys.group, job.entry_id)
            pipe.xdel(self.keys.jobs, job.entry_id)
            if job.spec.reply_to:
                pipe.publish(job.spec.reply_to, job.spec.id)
        pipe.execute()

    def touch(self, entry_ids: list[str]) -> None:
        """Reset the idle time of entries this worker still works on, so that only a dead
        worker's jobs are ever reclaimed (JUSTID: the delivery count does not grow)."""
        if entry_ids:
            self.r.xclaim(self.keys.jobs, self.keys.group, self.consumer, 0, entry_ids,
                          justid=True)

    def dead_letter(self, job: Job, reason: str) -> None:
        log.warning("dead-lettering job %s: %s", job.spec.id, reason)
        record = {"job": job.spec.id, "entry": job.entry_id, "reason": reason,
                  "spec": json.dumps({**job.spec.__dict__, "points": None})}
        self.r.xadd(self.keys.dead, record, maxlen=self.stream_maxlen, approximate=True)
        error = Result(job_id=job.spec.id, status=500, error=f"the job failed: {reason}")
        self.complete([(job, error)])

    def heartbeat(self, info: dict, ttl_s: float) -> None:
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self.keys.worker(self.consumer), json.dumps(info), px=int(ttl_s * 1000))
        pipe.zadd(self.keys.workers, {self.consumer: now})
        pipe.zremrangebyscore(self.keys.workers, 0, now - 10 * ttl_s)
        pipe.execute()

    def leave(self) -> None:
        """Announce a clean exit so /readyz stops counting this worker at once."""
        self.r.zrem(self.keys.workers, self.consumer)
        self.r.delete(self.keys.worker(self.consumer))

    def publish_model(self, info: dict) -> None:
        self.r.set(self.keys.model, json.dumps(info))

    def _delivery_counts(self, entry_ids: list[str]) -> dict[str, int]:
        lo, hi = min(entry_ids, key=_order), max(entry_ids, key=_order)
        rows = self.r.xpending_range(
            self.keys.jobs, self.keys.group, lo, hi, len(entry_ids) * 4 + 10, self.consumer
        )
        return {_text(row["message_id"]): int(row["times_delivered"]) for row in rows}

    def _parse(self, entry_id, fields) -> Job | None:
        entry_id = _text(entry_id)
        try:
            job = Job.from_fields(entry_id, fields)
        except (KeyError, ValueError, TypeError) as exc:  # never let one bad entry wedge us
            log.error("dropping malformed entry %s: %s", entry_id, exc)
            self.r.xack(self.keys.jobs, self.keys.group, entry_id)
            self.r.xdel(self.keys.jobs, entry_id)
            return None
        return job


def ensure_group(client: redis.Redis, keys: Keys) -> None:
    try:
        client.xgroup_create(keys.jobs, keys.group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _order(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)
