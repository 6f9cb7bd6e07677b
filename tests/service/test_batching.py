import numpy as np

from cleandift.service.messages import Job, JobSpec
from cleandift.service.worker.batching import collate_requests


def job(size=256, prompt="", mode="clean", layers=("us6",), images=1, t=0.0):
    spec = JobSpec(kind="features" if images == 1 else "correspond", input_size=size,
                   layers=list(layers), image_sizes=[(10, 10)] * images, prompt=prompt, mode=mode,
                   enqueued_at=t)
    return Job(spec=spec, images=[np.zeros((size, size, 3), np.uint8)] * images)


def test_compatible_jobs_share_a_batch_and_layers_merge():
    jobs = [job(layers=["us9"], t=1), job(layers=["mid", "us6"], t=2), job(images=2, t=3)]
    [batch] = collate_requests(jobs, max_batch=8, max_pixels=10**9)
    assert batch.jobs == jobs
    assert batch.layers == ["mid", "us6", "us9"]
    assert [(r.start, r.stop) for r in batch.rows()] == [(0, 1), (1, 2), (2, 4)]
    assert len(batch.images) == 4


def test_incompatible_jobs_are_split_oldest_first():
    jobs = [job(size=512, t=2), job(size=256, t=1), job(prompt="a cat", t=3),
            job(mode="dift", t=4), job(size=512, t=5)]
    batches = collate_requests(jobs, max_batch=8, max_pixels=10**9)
    keys = [(b.input_size, b.prompt, b.mode, len(b.jobs)) for b in batches]
    assert keys == [(256, "", "clean", 1), (512, "", "clean", 2), (256, "a cat", "clean", 1),
                    (256, "", "dift", 1)]


def test_max_batch_and_pixel_budget():
    jobs = [job(t=i) for i in range(5)]
    assert [len(b.jobs) for b in collate_requests(jobs, 2, 10**9)] == [2, 2, 1]
    budget = 3 * 256 * 256
    assert [len(b.jobs) for b in collate_requests(jobs, 8, budget)] == [3, 2]
    # A DIFT image costs eight clean ones; a job over budget still runs, alone.
    dift = [job(mode="dift", t=i) for i in range(2)]
    assert [len(b.jobs) for b in collate_requests(dift, 8, budget)] == [1, 1]


def test_empty_input():
    assert collate_requests([], 4, 10**6) == []
