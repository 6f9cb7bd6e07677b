"""Every Redis key and channel the service uses, under one prefix."""

from __future__ import annotations

from dataclasses import dataclass

from cleandift.registry import announce_channel


@dataclass(frozen=True)
class Keys:
    """`served` (a model's served name) gives a model its own stream, group, dead letters,
    wake list, workers and results under `PREFIX.NAME:`; without it the keys are today's
    `PREFIX:` (one-model deployments and their autoscalers keep working unchanged)."""

    prefix: str = "cleandift"
    served: str | None = None  # the model's served name

    @property
    def ns(self) -> str:
        return f"{self.prefix}.{self.served}" if self.served else self.prefix

    def for_model(self, name: str | None) -> Keys:
        return Keys(self.prefix, name)

    @property
    def jobs(self) -> str:
        return f"{self.ns}:jobs"

    @property
    def group(self) -> str:
        return "workers"

    @property
    def dead(self) -> str:
        return f"{self.ns}:dead"

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
        return f"{self.ns}:result:{job_id}"

    def cancelled(self, job_id: str) -> str:
        """Set by the API when the client of an accepted job went away: a worker drops
        the job, or stops its work at the next stage boundary."""
        return f"{self.ns}:cancelled:{job_id}"

    def replies(self, api_id: str) -> str:
        return f"{self.ns}:replies:{api_id}"
