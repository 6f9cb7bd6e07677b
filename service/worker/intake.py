"""What reaches the GPU: claimed jobs, minus those nobody waits for any more, those the
batch cannot take, those whose images do not decode and those the feature cache answers,
collated into batches and prepared (pinned, stacked) for the forward pass.

Each refusal is answered here, on its own; one bad job never fails a batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from cleandift.extractor import Extractor
from cleandift.settings import Settings

from ..featurecache import FeatureCache
from ..messages import Job, Result
from ..metrics import WorkerMetrics
from . import isolation, stages
from .batching import collate_requests
from .claiming import CLAIM_BLOCK_MS, Claimer
from .decoding import Decoder
from .holder import ModelHolder
from .lease import Lease
from .waiting import Waiting

Answer = tuple[Job, Result]


class Intake:
    def __init__(self, settings: Settings, model: ModelHolder, claimer: Claimer,
                 lease: Lease, waiting: Waiting, cache: FeatureCache | None,
                 metrics: WorkerMetrics, answer: Callable[[list[Answer]], None],
                 release: Callable[[list[Job]], None],
                 to_core: Callable[[stages.Prepared], None],
                 to_post: Callable[[stages.Computed], None]) -> None:
        self.settings, self.model, self.claimer, self.lease = settings, model, claimer, lease
        self.waiting, self.cache, self.metrics = waiting, cache, metrics
        self.answer, self.release, self.to_core, self.to_post = answer, release, to_core, to_post
        self.decoder = Decoder(settings)

    def run(self, stopping: threading.Event) -> None:
        """Claim, filter and prepare until `stopping`."""
        pin = self.model.current.device.type == "cuda"
        while not stopping.is_set():
            if self.lease.stuck():  # claim nothing while a forward hangs: other workers
                stopping.wait(CLAIM_BLOCK_MS / 1000)  # take its jobs over, and new ones
                continue
            jobs, version = self.claimer.next()
            self.lease.hold(job.entry for job in jobs)
            extractor = self.model.get(version)
            if extractor is None:  # the fleet switched to a version this worker lacks
                self.release(jobs)
                continue
            self.waiting.watch(jobs)
            jobs, refused = isolation.batchable(self._live(jobs))
            self.answer(refused)
            jobs, undecodable = self.decoder.decode(jobs)  # the cache keys on the pixels
            self.answer(undecodable)
            for batch in collate_requests(self._from_cache(jobs, extractor),
                                          self.settings.max_batch,
                                          self.settings.max_batch_pixels):
                prepared, failed = isolation.prepare(batch, pin)  # one bad job fails alone
                self.answer(failed)
                for part in prepared:
                    part.version = version
                    self.to_core(part)

    def close(self) -> None:
        self.decoder.close()

    def _live(self, jobs: list[Job]) -> list[Job]:
        """Drop (and answer) jobs nobody waits for: they never reach the GPU."""
        now = time.time()
        for job in jobs:
            self.metrics.queue_wait.observe(max(0.0, now - job.spec.enqueued_at))
        live, answers = isolation.unwaited(jobs, self.waiting)
        self.answer(answers)
        return live

    def _from_cache(self, jobs: list[Job], extractor: Extractor) -> list[Job]:
        """Jobs whose maps the cache holds go straight to the post stage; the rest return."""
        if self.cache is None:
            return jobs
        left = []
        for job in jobs:
            maps, where = self.cache.lookup(job, extractor)
            self.metrics.cache_lookups.labels(result=where).inc()
            if maps is None:
                left.append(job)
            else:
                self.to_post(stages.from_cache(job, maps, extractor))
        return left
