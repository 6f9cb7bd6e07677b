"""A model's queue over several streams (partitions), spread over Redis Cluster nodes.

One Redis core moves a few thousand small jobs a second; past that a model's queue is
split into `queue_partitions` streams, each with its own group, pending list, dead
letters and results (service/queue/keys.py), which a cluster places on different nodes.
Everything per stream is the one-stream code unchanged (JobProducer, JobConsumer, one per
partition); this module only spreads the work:

- the API sends each job to the partition with the fewest jobs waiting (as its monitor
  last saw them), and to the next one when that partition's node is away or full;
- a worker takes jobs from every partition: a sweep without waiting that fills its batch
  from several partitions, else a short wait on one partition, in turn, starting at its
  own; reclaim and dead letters run per partition; a job is acknowledged where it was
  read (`Job.partition`).

The model's shared keys (workers, model, live version, cancel marks) live in one slot.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence

import redis

from cleandift.contract import ModelInfo
from cleandift.settings import Settings

from ..messages import Entry, Heartbeat, Job, Result
from .connect import async_client, queue_keys
from .consumer import Answer, JobConsumer
from .errors import PartiallyStored, QueueFull, QueueUnavailable
from .producer import JobProducer

MIN_WAIT_MS = 20  # the shortest wait on one partition while the worker is idle


def make_producer(settings: Settings, redis_url: str, served: str | None
                  ) -> JobProducer | PartitionedProducer:
    """The API's queue for one served model, as the settings shape it."""
    keys, count = queue_keys(settings, served), settings.queue_partitions
    client = async_client(redis_url, cluster=settings.redis_cluster)

    def one(partition: int | None, max_queue: int) -> JobProducer:
        return JobProducer(client, keys.for_partition(partition), max_queue=max_queue,
                           stream_maxlen=settings.stream_maxlen,
                           worker_ttl_s=settings.worker_ttl_s)

    if count == 1:
        return one(None, settings.max_queue)
    share = math.ceil(settings.max_queue / count)
    return PartitionedProducer([one(p, share) for p in range(count)])


def make_consumer(settings: Settings, client: redis.Redis, served: str | None, name: str,
                  ) -> JobConsumer | PartitionedConsumer:
    """A worker's queue for its model, as the settings shape it."""
    keys, count = queue_keys(settings, served), settings.queue_partitions

    def one(partition: int | None) -> JobConsumer:
        return JobConsumer(client, keys.for_partition(partition), name,
                           visibility_timeout_s=settings.visibility_timeout_s,
                           max_deliveries=settings.max_deliveries,
                           result_ttl_s=settings.result_ttl_s,
                           stream_maxlen=settings.stream_maxlen)

    if count == 1:
        return one(None)
    return PartitionedConsumer([one(p) for p in range(count)],
                               home=hash_home(name, count))


def hash_home(name: str, count: int) -> int:
    """A stable first partition per worker name, so idle waits spread over partitions."""
    return sum(name.encode()) % count


class PartitionedProducer:
    """JobProducer's interface over one producer per partition."""

    def __init__(self, parts: list[JobProducer]) -> None:
        self.parts = parts
        self._next = 0

    async def start(self) -> None:
        await asyncio.gather(*(part.start() for part in self.parts))

    async def stop(self) -> None:
        await asyncio.gather(*(part.stop() for part in self.parts))

    async def admit(self) -> None:
        """Admitted when any partition would take the job (each refuses as one queue)."""
        error: Exception | None = None
        for part in self.parts:
            try:
                return await part.admit()
            except (QueueFull, QueueUnavailable) as exc:
                error = exc
        assert error is not None
        raise error

    async def submit(self, job: Job, *, again: bool = False,
                     gone: Callable[[], Awaitable[bool]] | None = None) -> Result:
        """To the least-loaded reachable partition; the next one when it refuses."""
        error: Exception | None = None
        for part in self._order():
            try:
                return await part.submit(job, again=again, gone=gone)
            except (QueueFull, QueueUnavailable) as exc:  # raised before the job was sent
                error = exc
        assert error is not None
        raise error

    def _order(self) -> list[JobProducer]:
        """Reachable partitions by depth (ties in turn), then the unreachable ones."""
        self._next = (self._next + 1) % len(self.parts)
        turn = self.parts[self._next:] + self.parts[:self._next]
        return sorted(turn, key=lambda part: (not part.view.reachable, part.view.depth))

    def decode_here(self, decode_at: str) -> bool:
        return any(part.decode_here(decode_at) for part in self.parts)

    async def ping(self) -> bool:
        """Reachable when some partition is: requests go to the others meanwhile."""
        return any(await asyncio.gather(*(part.ping() for part in self.parts)))

    # The model's shared keys: read through the first partition's producer (any would do).
    async def live_workers(self) -> list[str]:
        return await self.parts[0].live_workers()

    async def heartbeats(self) -> list[Heartbeat]:
        return await self.parts[0].heartbeats()

    async def model_info(self, *, fresh: bool = False) -> ModelInfo | None:
        return await self.parts[0].model_info(fresh=fresh)

    async def queue_state(self) -> tuple[int, int]:
        """Summed over the partitions (what an autoscaler sums too, docs/scale.md)."""
        states = await asyncio.gather(*(part.queue_state() for part in self.parts))
        return sum(s[0] for s in states), sum(s[1] for s in states)


class PartitionedConsumer:
    """JobConsumer's interface over one consumer per partition, for one worker."""

    def __init__(self, parts: list[JobConsumer], home: int = 0) -> None:
        self.parts = parts
        self.consumer = parts[0].consumer
        self._turn = home % len(parts)

    def claim(self, count: int, block_ms: int) -> list[Job]:
        """Up to `count` jobs from the partitions in turn, at once (a full batch rather
        than one partition's few); when none waits anywhere, a short wait on one of them.
        A partition whose node is away is passed over (QueueUnavailable when all are)."""
        order = self.parts[self._turn:] + self.parts[:self._turn]
        self._turn = (self._turn + 1) % len(self.parts)
        jobs: list[Job] = []
        reachable: list[JobConsumer] = []
        error: QueueUnavailable | None = None
        for part in order:
            try:
                jobs += part.claim(count - len(jobs), 0)
            except QueueUnavailable as exc:
                error = exc
                continue
            reachable.append(part)
            if len(jobs) >= count:
                break
        if jobs:
            return jobs
        if not reachable:
            assert error is not None
            raise error
        return reachable[0].claim(count, max(MIN_WAIT_MS, block_ms // len(self.parts)))

    def reclaim(self, count: int) -> tuple[list[Job], int]:
        jobs: list[Job] = []
        dead, failed = 0, 0
        for part in self.parts:
            try:
                taken, lost = part.reclaim(count - len(jobs))
            except QueueUnavailable:
                failed += 1
                continue
            jobs, dead = jobs + taken, dead + lost
            if len(jobs) >= count:
                break
        if failed == len(self.parts):
            raise QueueUnavailable("no partition of the queue is reachable")
        return jobs, dead

    def claim_own_pending(self, count: int, after: str = "0") -> tuple[list[Job], int, str]:
        """Page through each partition in turn; the cursor is `PARTITION@ENTRY`."""
        part, _, since = after.rpartition("@")
        index = int(part) if part else 0
        jobs, dead, last = self.parts[index].claim_own_pending(count, since)
        if last:
            return jobs, dead, f"{index}@{last}"
        if index + 1 < len(self.parts):
            return jobs, dead, f"{index + 1}@0"
        return jobs, dead, ""

    def complete(self, answers: Sequence[Answer]) -> None:
        """Each partition's answers where their jobs were read. Those of a partition that
        is away are left to retry alone (PartiallyStored), not stored twice."""
        by_part: dict[int, list[Answer]] = defaultdict(list)
        for job, result in answers:
            by_part[job.partition].append((job, result))
        left: list[Answer] = []
        for index, group in by_part.items():
            try:
                self.parts[index].complete(group)
            except QueueUnavailable:
                left.extend(group)
        if left:
            raise PartiallyStored(f"{len(left)} answers wait for their partition", left)

    def touch(self, entries: Sequence[Entry]) -> None:
        by_part: dict[int, list[Entry]] = defaultdict(list)
        for entry in entries:
            by_part[entry[0]].append(entry)
        failed = 0
        for index, group in by_part.items():
            try:
                self.parts[index].touch(group)
            except QueueUnavailable:
                failed += 1
        if failed:
            raise QueueUnavailable(f"{failed} partitions could not be touched")

    def cancelled(self, job_ids: Sequence[str]) -> set[str]:
        return self.parts[0].cancelled(job_ids)  # cancel marks are shared keys

    def heartbeat(self, beat: Heartbeat, ttl_s: float) -> None:
        self.parts[0].heartbeat(beat, ttl_s)

    def leave(self) -> None:
        self.parts[0].leave()

    def publish_model(self, info_json: str) -> None:
        """Once (a shared key); every partition remembers it, to publish it again if its
        node restarted empty."""
        self.parts[0].publish_model(info_json)
        for part in self.parts[1:]:
            part.remember_model(info_json)


Producer = JobProducer | PartitionedProducer  # what the API's routes submit through
