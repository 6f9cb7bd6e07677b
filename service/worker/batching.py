"""Dynamic batching as one pure function, testable without Redis or a model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cleandift.contract import validate_layers
from cleandift.images import noise_seed
from cleandift.method import DIFT_ENSEMBLE

from ..messages import Job


@dataclass
class Batch:
    """Jobs that share one forward pass: same input size, prompt and mode."""

    jobs: list[Job]
    layers: list[str]

    @property
    def input_size(self) -> int:
        return self.jobs[0].spec.input_size

    @property
    def prompt(self) -> str:
        return self.jobs[0].spec.prompt

    @property
    def mode(self) -> str:
        return self.jobs[0].spec.mode

    @property
    def images(self) -> list[np.ndarray]:
        return [image for job in self.jobs for image in job.images]

    def noise_seeds(self) -> list[int] | None:
        """DIFT's noise seeded by each image's content hash: a DIFT answer depends on the
        image alone (not on its batch neighbours), so it can be cached and reproduced."""
        digests = [d for job in self.jobs for d in job.digests]
        if self.mode != "dift" or len(digests) != len(self.images):
            return None
        return [noise_seed(digest) for digest in digests]

    def halves(self) -> list[Batch]:
        """These jobs as two smaller batches: a failed batch is bisected down to the job
        that fails, so its batch-mates are answered."""
        middle = len(self.jobs) // 2
        return [batch_of(self.jobs[:middle]), batch_of(self.jobs[middle:])]

    def rows(self) -> list[slice]:
        """The rows of the batch tensor that belong to each job, in job order."""
        out, start = [], 0
        for job in self.jobs:
            out.append(slice(start, start + len(job.images)))
            start += len(job.images)
        return out


def batch_of(jobs: list[Job]) -> Batch:
    """A batch of compatible jobs; the union of their layers is computed once."""
    return Batch(jobs=jobs, layers=validate_layers([k for j in jobs for k in j.spec.layers], []))


def job_cost(job: Job) -> int:
    """Pixels the job puts through the UNet (a DIFT ensemble runs every image 8 times)."""
    return job.pixels * (DIFT_ENSEMBLE if job.spec.mode == "dift" else 1)


def collate_requests(jobs: list[Job], max_batch: int, max_pixels: int) -> list[Batch]:
    """Group jobs into batches of compatible jobs, oldest first.

    A batch holds at most `max_batch` images and `max_pixels` of UNet work; a job larger
    than the pixel budget still runs, alone. Layer sets are merged (the union is computed
    once and each job later takes its own keys).
    """
    open_batches: dict[tuple, list[Job]] = {}
    done: list[list[Job]] = []
    for job in jobs:
        key = job.spec.group_key()
        current = open_batches.get(key, [])
        images = sum(len(j.spec.image_sizes) for j in current) + len(job.spec.image_sizes)
        cost = sum(job_cost(j) for j in current) + job_cost(job)
        if current and (images > max_batch or cost > max_pixels):
            done.append(current)
            current = []
        current.append(job)
        open_batches[key] = current
    done.extend(open_batches.values())
    done.sort(key=lambda group: min(j.spec.enqueued_at for j in group))
    return [batch_of(group) for group in done if group]
