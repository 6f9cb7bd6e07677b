"""Every Redis key and channel the service uses, under one prefix."""

from __future__ import annotations

from dataclasses import dataclass

from cleandift.registry import announce_channel


@dataclass(frozen=True)
class Keys:
    prefix: str = "cleandift"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def group(self) -> str:
        return "workers"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def wake(self) -> str:
        """A list the API pushes to while no worker lives: what an autoscaler (KEDA's
        redis list trigger) watches to start workers from zero."""
        return f"{self.prefix}:wake"

    @property
    def model(self) -> str:
        return f"{self.prefix}:model"

    @property
    def registry_channel(self) -> str:
        return announce_channel(self.prefix)

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}:result:{job_id}"

    def cancelled(self, job_id: str) -> str:
        """Set by the API when the client of an accepted job went away: a worker drops
        the job, or stops its work at the next stage boundary."""
        return f"{self.prefix}:cancelled:{job_id}"

    def replies(self, api_id: str) -> str:
        return f"{self.prefix}:replies:{api_id}"
