"""Every Redis key and channel the service uses, under one prefix."""

from __future__ import annotations

from dataclasses import dataclass, replace

from cleandift.registry import announce_channel


@dataclass(frozen=True)
class Keys:
    """`served` (a model's served name) gives a model its own stream, group, dead letters,
    wake list, workers and results under `PREFIX.NAME:`; without it the keys are today's
    `PREFIX:` (one-model deployments and their autoscalers keep working unchanged).

    `partition` (a sharded queue, docs/scale.md): the stream, its dead letters and its
    results under `NS#P:`, one set per partition; the rest of a model's keys stay shared.
    `cluster`: every name carries a Redis Cluster hash tag (`{NS}`, `{NS#P}`): a
    partition's keys share a slot, and so do the model's shared keys (the scripts and
    MGETs that span them need one slot), while partitions spread over the nodes."""

    prefix: str = "cleandift"
    served: str | None = None  # the model's served name
    partition: int | None = None
    cluster: bool = False

    @property
    def ns(self) -> str:
        name = f"{self.prefix}.{self.served}" if self.served else self.prefix
        return f"{{{name}}}" if self.cluster else name

    @property
    def part_ns(self) -> str:
        """The namespace of this partition's keys (the shared one when unpartitioned)."""
        if self.partition is None:
            return self.ns
        name = f"{self.prefix}.{self.served}" if self.served else self.prefix
        name = f"{name}#{self.partition}"
        return f"{{{name}}}" if self.cluster else name

    def for_model(self, name: str | None) -> Keys:
        return replace(self, served=name, partition=None)

    def for_partition(self, partition: int | None) -> Keys:
        return replace(self, partition=partition)

    @property
    def cache_base(self) -> str:
        """The shared feature cache's keys (every model's, so one slot in a cluster)."""
        return f"{{{self.prefix}}}:cache:" if self.cluster else f"{self.prefix}:cache:"

    @property
    def jobs(self) -> str:
        return f"{self.part_ns}:jobs"

    @property
    def group(self) -> str:
        return "workers"

    @property
    def dead(self) -> str:
        return f"{self.part_ns}:dead"

    @property
    def workers(self) -> str:
        return f"{self.ns}:workers"

    @property
    def wake(self) -> str:
        """A list the API pushes to while no worker lives: what an autoscaler (KEDA's
        redis list trigger) watches to start workers from zero."""
        return f"{self.ns}:wake"

    @property
    def model(self) -> str:
        return f"{self.ns}:model"

    @property
    def live(self) -> str:
        """The version the model's fleet serves: set once every live worker has the new
        one loaded beside the old (the switch, service/worker/switch.py)."""
        return f"{self.ns}:live"

    @property
    def staged(self) -> str:
        """worker id -> the version it has loaded and can serve (\"!V\": it failed V)."""
        return f"{self.ns}:staged"

    @property
    def registry_channel(self) -> str:
        return announce_channel(self.prefix)

    def worker(self, worker_id: str) -> str:
        return f"{self.ns}:worker:{worker_id}"

    def result(self, job_id: str) -> str:
        """Beside its partition's stream: results spread over the nodes with the jobs."""
        return f"{self.part_ns}:result:{job_id}"

    def cancelled(self, job_id: str) -> str:
        """Set by the API when the client of an accepted job went away: a worker drops
        the job, or stops its work at the next stage boundary."""
        return f"{self.ns}:cancelled:{job_id}"

    def replies(self, api_id: str) -> str:
        return f"{self.ns}:replies:{api_id}"
