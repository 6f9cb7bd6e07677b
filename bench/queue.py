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
import redis.asyncio as aioredis

from cleandift.service.api.decoding import MemoryBudget
from cleandift.service.api.parsing import FeaturesParams, features_job
from cleandift.service.messages import Job, LayerMeta, Result, ResultMeta
from cleandift.service.processes.redis_server import start_redis_server
from cleandift.service.queue.consumer import JobConsumer
from cleandift.service.queue.keys import Keys
from cleandift.service.queue.producer import JobProducer
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
    "queue_api_cpu_ms_per_job_pixels": "API CPU to check and decode the photo (ms)",
    "queue_api_cpu_ms_per_job_uploads": "API CPU to check the photo's header (ms)",
    "queue_worker_decode_ms_per_job": "worker CPU to decode an upload (ms; v4 only)",
    "queue_bytes_pixels_vs_uploads": "bytes into Redis per job, pixels / uploads",
    "queue_jobs_per_s_uploads_vs_pixels": "jobs/s through one Redis, uploads / pixels",
}
CONSUMERS = 1  # processes; with the producer and Redis, the 2 cores are busy
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


def _consume(url: str, keys: Keys, name: str, stop: Any) -> None:
    """One consumer process (a worker is a process of its own): claim, answer, repeat."""
    consumer = JobConsumer(redis.Redis.from_url(url), keys, name, visibility_timeout_s=60,
                           max_deliveries=3, result_ttl_s=60, stream_maxlen=100_000)
    while not stop.is_set():
        jobs = consumer.claim(CLAIM_BATCH, 100)
        if jobs:
            consumer.complete([(job, _answer(job)) for job in jobs])


async def _produce(url: str, keys: Keys, template: Job, seconds: float) -> tuple[int, float]:
    producer = JobProducer(aioredis.from_url(url), keys, max_queue=100_000,
                           stream_maxlen=100_000, worker_ttl_s=60)
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


def queue_figures(jpeg: bytes, quick: bool) -> dict[str, float]:
    """Both formats through one private Redis, one after the other, same load."""
    settings = Settings(max_job_cost=1e9)
    figures: dict[str, float] = {}
    with start_redis_server() as server:
        client = redis.Redis.from_url(server.url)
        for images, decode in (("pixels", True), ("uploads", False)):
            template = one_job(jpeg, decode, settings)
            figures.update(_run(server, client, Keys(f"bench-{images}"), template, images,
                                3.0 if quick else 8.0))
    figures.update(image_costs(jpeg, settings, 5 if quick else 20))
    figures["queue_bytes_pixels_vs_uploads"] = (figures["queue_redis_bytes_in_per_job_pixels"]
                                                / figures["queue_redis_bytes_in_per_job_uploads"])
    figures["queue_jobs_per_s_uploads_vs_pixels"] = (figures["queue_jobs_per_s_uploads"]
                                                     / figures["queue_jobs_per_s_pixels"])
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


def _run(server: Any, client: redis.Redis, keys: Keys, template: Job, images: str,
         seconds: float) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    consumers = [context.Process(target=_consume, args=(server.url, keys, f"c{i}", stop),
                                 daemon=True) for i in range(CONSUMERS)]
    for process in consumers:
        process.start()
    asyncio.run(_produce(server.url, keys, template, 1.0))  # warm-up
    bytes_before = client.info("stats")["total_net_input_bytes"]
    pids = {"redis": server.pid, "consumer": consumers[0].pid}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    producer_before = time.process_time()
    done, elapsed = asyncio.run(_produce(server.url, keys, template, seconds))
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    cpu["producer"] = time.process_time() - producer_before
    bytes_in = client.info("stats")["total_net_input_bytes"] - bytes_before
    stop.set()
    for process in consumers:
        process.join()
    return {f"queue_job_bytes_{images}": template.image_bytes,
            f"queue_redis_bytes_in_per_job_{images}": bytes_in / done,
            **{f"queue_{name}_cpu_ms_per_job_{images}": seconds / done * 1000
               for name, seconds in cpu.items()},
            f"queue_jobs_per_s_{images}": done / elapsed}
