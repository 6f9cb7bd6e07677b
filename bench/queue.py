"""What the queue itself moves: jobs/s through Redis, and Redis' cost per job.

The API's own code builds the job (a 640 x 480 JPEG photo asked for us6 at 768 px, SD 2.1's
size) in both formats: `pixels` (the API decodes; what every job carried before v4) and
`uploads` (v4: the photo as sent; the worker decodes). The real `JobProducer` submits it
and waits for each answer; the real `JobConsumer` claims, answers and acknowledges as a
worker holding its results does (the answer names where the features wait, as a worker
with the direct result path writes it). Nothing is decoded or computed on the consumer's
side: decoding and the forward are the GPU worker's, measured by the other parts, so
these figures are the ceiling of the queue alone. Redis is a private server started
here, so its CPU time (from /proc) and its bytes in (INFO) are the jobs' alone.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from typing import Any

import redis

from cleandift.service.api.decoding import MemoryBudget
from cleandift.service.api.parsing import FeaturesParams, features_job
from cleandift.service.messages import Job, LayerMeta, Result, ResultMeta
from cleandift.service.processes.redis_cluster import start_redis_cluster
from cleandift.service.processes.redis_server import start_redis_server
from cleandift.service.queue.connect import sync_client
from cleandift.service.queue.partitions import make_consumer, make_producer
from cleandift.settings import Settings

from .shapes import ShapeOnlyExtractor
from .transport import cpu_seconds

_WHAT = {"pixels": "pixels (the API decodes)", "uploads": "uploads (v4, the worker decodes)"}
QUEUE_DESCRIPTIONS = {
    **{key: text for images, what in _WHAT.items() for key, text in (
        (f"queue_job_bytes_{images}", f"image bytes of one us6 job at 768 px, {what}"),
        (f"queue_redis_bytes_in_per_job_{images}", f"bytes Redis received per job, {what}"),
        (f"queue_redis_cpu_ms_per_job_{images}", f"Redis CPU per job (ms), {what}"),
        (f"queue_producer_cpu_ms_per_job_{images}", f"API's queue client CPU per job (ms), "
                                                    f"{what}"),
        (f"queue_consumer_cpu_ms_per_job_{images}", f"worker's queue client CPU per job "
                                                    f"(ms), {what}"),
        (f"queue_jobs_per_s_{images}", f"jobs/s through one Redis and back, {what}"))},
    **{key.format(tag="uploads_3_shards"): f"{text}, uploads through a 3-node Redis Cluster "
       "(12 partitions)" for key, text in (
           ("queue_redis_bytes_in_per_job_{tag}", "bytes all nodes received per job"),
           ("queue_redis_cpu_ms_per_job_{tag}", "CPU of all nodes per job (ms)"),
           ("queue_producer_cpu_ms_per_job_{tag}", "API's queue client CPU per job (ms)"),
           ("queue_consumer_cpu_ms_per_job_{tag}", "worker's queue client CPU per job (ms)"),
           ("queue_jobs_per_s_{tag}", "jobs/s"))},
    "queue_job_bytes_uploads_3_shards": "image bytes of one us6 job (uploads, sharded run)",
    "queue_jobs_per_s_3_shards_vs_one": "jobs/s, 3-node cluster / one Redis (uploads)",
    "queue_api_cpu_ms_per_job_pixels": "API CPU to check and decode the photo (ms)",
    "queue_api_cpu_ms_per_job_uploads": "API CPU to check the photo's header (ms)",
    "queue_worker_decode_ms_per_job": "worker CPU to decode an upload (ms; v4 only)",
    "queue_bytes_pixels_vs_uploads": "bytes into Redis per job, pixels / uploads",
    "queue_jobs_per_s_uploads_vs_pixels": "jobs/s through one Redis, uploads / pixels",
}
CONSUMERS = 1  # processes; with the producer and Redis, the 2 cores are busy
SHARDS, PARTITIONS = 3, 12  # the sharded run: a 3-node cluster, 4 partitions per node
IN_FLIGHT = 32
CLAIM_BATCH = 8


def photo_jpeg(width: int = 640, height: int = 480, noise: float = 12.0) -> bytes:
    """A JPEG as detailed as a camera photo of that size (about 110 KB at 640 x 480, quality
    90): the synthetic scene of the other parts, with sensor-like noise. A smooth synthetic
    image compresses to a third of that and would flatter the uploads."""
    import io

    import numpy as np
    from PIL import Image

    from cleandift.trainer.synthetic import synthetic_image

    rng = np.random.default_rng(0)
    scene = np.asarray(synthetic_image(max(width, height), rng)[0].resize((width, height)))
    noisy = np.clip(scene + rng.normal(0, noise, scene.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def one_job(jpeg: bytes, decode: bool, settings: Settings) -> Job:
    """The job the API makes for this photo (us6 at SD 2.1's 768 px)."""
    info = ShapeOnlyExtractor().info
    params = FeaturesParams(layers=["us6"])
    return asyncio.run(features_job(params, {"image": [jpeg]}, settings, info,
                                    MemoryBudget(1 << 30), decode=decode))


def _answer(job: Job) -> Result:
    shape = [1280, 48, 48]
    return Result(ResultMeta(job_id=job.spec.id, model="sd21-shapes", model_version="bench",
                             layers={"us6": LayerMeta(shape=shape, dtype="float16")},
                             location="http://127.0.0.1:9/results/x", token="t" * 32,
                             nbytes=1280 * 48 * 48 * 2))


def _consume(settings: Settings, name: str, stop: Any) -> None:
    """One consumer process (a worker is a process of its own): claim, answer, repeat.
    Its queue is the worker's (one stream, or every partition of a sharded one)."""
    client = sync_client(str(settings.redis_url), cluster=settings.redis_cluster)
    consumer = make_consumer(settings, client, None, name)
    while not stop.is_set():
        jobs = consumer.claim(CLAIM_BATCH, 100)
        if jobs:
            consumer.complete([(job, _answer(job)) for job in jobs])


async def _produce(settings: Settings, template: Job, seconds: float) -> tuple[int, float]:
    producer = make_producer(settings, str(settings.redis_url), None)
    await producer.start()
    done, stop_at = 0, time.perf_counter() + seconds

    async def lane() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            job = Job(spec=template.spec.model_copy(update={"id": f"{time.time_ns()}-{id(lane)}",
                                                           "deadline": time.time() + 60}),
                      images=template.images, uploads=template.uploads)
            result = await producer.submit(job)
            assert result.meta.status == 200
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(IN_FLIGHT)))
    elapsed = time.perf_counter() - start
    await producer.stop()
    return done, elapsed


def _queue_settings(url: str, prefix: str, partitions: int = 1) -> Settings:
    return Settings(redis_url=url, queue_prefix=prefix, redis_cluster=partitions > 1,
                    queue_partitions=partitions, max_queue=100_000, stream_maxlen=100_000,
                    worker_ttl_s=60, visibility_timeout_s=60, result_ttl_s=60)


def queue_figures(jpeg: bytes, quick: bool) -> dict[str, float]:
    """Both formats through one private Redis, one after the other, same load."""
    settings = Settings(max_job_cost=1e9)
    figures: dict[str, float] = {}
    seconds = 3.0 if quick else 8.0
    with start_redis_server() as server:
        for images, decode in (("pixels", True), ("uploads", False)):
            template = one_job(jpeg, decode, settings)
            figures.update(_run([server], _queue_settings(server.url, f"bench-{images}"),
                                template, images, seconds))
    with start_redis_cluster(SHARDS) as cluster:  # the same uploads jobs, sharded
        figures.update(_run(cluster.nodes, _queue_settings(
            cluster.url, "bench-shards", PARTITIONS), one_job(jpeg, False, settings),
            "uploads", seconds, suffix=f"_{SHARDS}_shards"))
    figures.update(image_costs(jpeg, settings, 5 if quick else 20))
    figures["queue_bytes_pixels_vs_uploads"] = (figures["queue_redis_bytes_in_per_job_pixels"]
                                                / figures["queue_redis_bytes_in_per_job_uploads"])
    figures["queue_jobs_per_s_uploads_vs_pixels"] = (figures["queue_jobs_per_s_uploads"]
                                                     / figures["queue_jobs_per_s_pixels"])
    figures[f"queue_jobs_per_s_{SHARDS}_shards_vs_one"] = (
        figures[f"queue_jobs_per_s_uploads_{SHARDS}_shards"] / figures["queue_jobs_per_s_uploads"])
    return figures


def image_costs(jpeg: bytes, settings: Settings, repeats: int) -> dict[str, float]:
    """CPU per job of the image's other hops, with the functions the API and the worker
    call: the API's check of the header (and its decode, before v4), the worker's decode."""
    from cleandift.images import ImageSource, upload_digest
    from cleandift.service.api.decoding import _model_view
    from cleandift.service.worker.decoding import Decoder

    size = ShapeOnlyExtractor().info.input_size
    limits = {"max_bytes": settings.max_body_bytes, "max_pixels": settings.max_image_pixels}
    steps = {"pixels": lambda: _model_view(ImageSource(jpeg, **limits), size),
             "uploads": lambda: upload_digest(jpeg) and ImageSource(jpeg, **limits)}
    figures = {}
    for images, step in steps.items():
        step()
        start = time.process_time()
        for _ in range(repeats):
            step()
        figures[f"queue_api_cpu_ms_per_job_{images}"] = (time.process_time() - start
                                                         ) / repeats * 1e3
    decoder, jobs = Decoder(settings), [one_job(jpeg, False, settings) for _ in range(repeats)]
    start = time.process_time()
    for job in jobs:
        decoder.decode([job])
    figures["queue_worker_decode_ms_per_job"] = (time.process_time() - start) / repeats * 1e3
    decoder.close()
    return figures


def _run(servers: list[Any], settings: Settings, template: Job, images: str,
         seconds: float, suffix: str = "") -> dict[str, float]:
    """`servers`: the Redis processes the queue lives on (their CPU and bytes in count)."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    consumers = [context.Process(target=_consume, args=(settings, f"c{i}", stop),
                                 daemon=True) for i in range(CONSUMERS)]
    for process in consumers:
        process.start()
    asyncio.run(_produce(settings, template, 1.0))  # warm-up
    clients = [redis.Redis(port=server.port) for server in servers]

    def bytes_in() -> int:
        return sum(c.info("stats")["total_net_input_bytes"] for c in clients)

    bytes_before = bytes_in()
    pids = {**{f"redis{i}": server.pid for i, server in enumerate(servers)},
            "consumer": consumers[0].pid}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    producer_before = time.process_time()
    done, elapsed = asyncio.run(_produce(settings, template, seconds))
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    cpu["redis"] = sum(cpu.pop(f"redis{i}") for i in range(len(servers)))
    cpu["producer"] = time.process_time() - producer_before
    received = bytes_in() - bytes_before
    stop.set()
    for process in consumers:
        process.join()
    tag = f"{images}{suffix}"
    return {f"queue_job_bytes_{tag}": template.image_bytes,
            f"queue_redis_bytes_in_per_job_{tag}": received / done,
            **{f"queue_{name}_cpu_ms_per_job_{tag}": seconds / done * 1000
               for name, seconds in cpu.items()},
            f"queue_jobs_per_s_{tag}": done / elapsed}
