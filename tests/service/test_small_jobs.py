"""Small jobs (format v4): the upload travels as sent and the worker decodes it.

The pixels a worker makes must be the ones the API made before (the cache key and DIFT's
noise seed depend on them): checked against the API's own path and, for formats Pillow
decodes without a reduced scale, against Pillow called directly (an independent
reference). A bad upload fails its own job, never its batch."""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import pytest
from PIL import Image

from cleandift.images import pixels_digest, upload_digest
from cleandift.service.api.decoding import MemoryBudget, take_upload
from cleandift.service.messages import UPLOADS_VERSION, Heartbeat, Job, JobSpec
from cleandift.service.queue.consumer import JobConsumer
from cleandift.service.queue.keys import Keys
from cleandift.service.worker.decoding import Decoder
from cleandift.service.worker.isolation import batchable
from cleandift.settings import Settings
from tests.corpus import bad_images, encode, good_images, rotated_jpeg, textured_image
from tests.service.service_helpers import (
    expected_features,
    metric,
    redis_client,
    running_service,
)

SIZE = 256


def _job(kind: str, uploads: list[bytes], sizes: list[tuple[int, int]], **spec) -> Job:
    spec = JobSpec(kind=kind, input_size=SIZE, layers=["us6"], image_sizes=sizes,
                   content=[upload_digest(u) for u in uploads], **spec)
    return Job(spec=spec, images=[], uploads=uploads)


def _api_pixels(data: bytes, settings: Settings) -> np.ndarray:
    upload = asyncio.run(take_upload("image", data, SIZE, settings, MemoryBudget(1 << 30),
                                     decode=True))
    assert upload.pixels is not None and upload.data is None
    return upload.pixels


@pytest.fixture
def decoder(settings):
    made = []

    def make(with_settings: Settings = settings) -> Decoder:
        made.append(Decoder(with_settings))
        return made[-1]

    yield make
    for one in made:
        one.close()


def _size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def test_a_job_with_uploads_travels_as_sent():
    jpeg = encode(textured_image(640, 480, seed=3), "JPEG", quality=90)
    job = _job("features", [jpeg], [(640, 480)])
    fields = job.to_fields()
    assert fields["v"] == str(UPLOADS_VERSION) and fields["enc0"] == jpeg
    assert "img0" not in fields and job.image_bytes == len(jpeg)
    back = Job.from_fields("1-0", {k.encode(): (v if isinstance(v, bytes) else str(v).encode())
                                   for k, v in fields.items()})
    assert back.uploads == [jpeg] and back.images == [] and back.spec == job.spec
    pixels = Job(spec=job.spec.model_copy(update={"content": ["x"]}),
                 images=[np.zeros((SIZE, SIZE, 3), np.uint8)])
    assert pixels.minimum_version() < UPLOADS_VERSION  # pixel jobs stay readable by old workers
    assert len(jpeg) * 5 < SIZE * SIZE * 3 * (768 / SIZE) ** 2  # the point of it, at 768 px


@pytest.mark.parametrize("name", sorted(good_images()))
def test_the_worker_makes_the_pixels_the_api_made(name, settings, decoder):
    data = good_images()[name]
    job = _job("features", [data], [(0, 0)])
    ready, failed = decoder().decode([job])
    assert failed == [] and ready == [job] and job.uploads == []
    api = _api_pixels(data, settings)
    assert job.images[0].dtype == np.uint8 and np.array_equal(job.images[0], api)
    assert job.digests == [pixels_digest(api)]  # DIFT's noise seed: the same image, the same


def test_the_worker_pixels_match_pillow_called_directly(settings, decoder):
    """An independent reference: Pillow's own decode and bicubic resize (no reduced-scale
    decoding below 2x the model size), and JPEG draft mode for a large photo."""
    small = encode(textured_image(300, 200, seed=5), "PNG")
    large = encode(textured_image(1600, 1200, seed=6), "JPEG", quality=90)
    job = _job("correspond", [small, large], [_size(small), _size(large)])
    decoder().decode([job])
    reference = Image.open(io.BytesIO(small)).convert("RGB").resize((SIZE, SIZE),
                                                                     Image.Resampling.BICUBIC)
    assert np.array_equal(job.images[0], np.asarray(reference))
    drafted = Image.open(io.BytesIO(large))
    drafted.draft("RGB", (SIZE, SIZE))
    assert drafted.size == (400, 300)  # libjpeg decoded at 1/4 scale
    reference = drafted.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    assert np.array_equal(job.images[1], np.asarray(reference))


def test_a_bad_upload_fails_its_own_job_and_names_its_field(settings, decoder):
    good = encode(textured_image(64, 48, seed=4), "JPEG")
    bad = bad_images()
    jobs = [_job("features", [good], [(64, 48)]),
            _job("features", [bad["truncated_jpeg"]], [(64, 48)]),
            _job("correspond", [good, bad["truncated_png"]], [(64, 48), (64, 48)]),
            _job("correspond", [good, good, bad["text"]], [(64, 48)] * 3),
            _job("features", [good], [(64, 48)])]
    ready, failed = decoder().decode(jobs)
    assert ready == [jobs[0], jobs[4]]
    answers = {job.spec.id: result.meta for job, result in failed}
    assert [answers[j.spec.id].status for j in jobs[1:4]] == [400, 400, 400]
    assert answers[jobs[1].spec.id].error.startswith("image: the image data is corrupt")
    assert answers[jobs[2].spec.id].error.startswith("target: ")
    assert answers[jobs[3].spec.id].error.startswith("target 1: not a decodable image")


def test_the_worker_applies_its_own_limits(settings, decoder):
    big = encode(textured_image(400, 300, seed=7), "PNG")
    strict = settings.model_copy(update={"max_image_pixels": 1000})
    _, failed = decoder(strict).decode([_job("features", [big], [(400, 300)])])
    assert [result.meta.status for _, result in failed] == [413]


def test_a_size_the_header_did_not_tell_is_the_frame_of_the_points(settings, decoder):
    """The API took (60, 40) from a header; the pixels say (40, 60): points are checked
    again in the displayed frame."""
    data, shown = rotated_jpeg()
    inside = _job("features", [data], [(60, 40)], points=[(30.0, 50.0)])
    outside = _job("features", [data], [(60, 40)], points=[(50.0, 10.0)])
    ready, failed = decoder().decode([inside, outside])
    assert ready == [inside] and inside.spec.image_sizes == [shown]
    assert [result.meta.status for _, result in failed] == [422]


def test_uploads_that_do_not_match_the_images_are_refused_alone():
    good = encode(textured_image(64, 48, seed=4), "JPEG")
    wrong = _job("correspond", [good], [(64, 48), (64, 48)])
    right = _job("features", [good], [(64, 48)])
    ready, answers = batchable([wrong, right])
    assert ready == [right] and [job for job, _ in answers] == [wrong]


@pytest.mark.integration
def test_a_v4_job_is_answered_by_a_worker_that_reads_v3(settings):
    keys, r = Keys(settings.queue_prefix), redis_client(settings)
    old = JobConsumer(r, keys, "old-worker", visibility_timeout_s=30, max_deliveries=3,
                      result_ttl_s=60, stream_maxlen=1000, readable_versions=(1, 2, 3))
    job = _job("features", [encode(textured_image(64, 48), "JPEG")], [(64, 48)],
               reply_to="test-replies")
    r.xadd(keys.jobs, job.to_fields())  # type: ignore[arg-type]
    assert old.claim(10, 100) == []  # refused, not run
    from cleandift.service.messages import Result

    deadline = time.monotonic() + 10
    while not (fields := r.hgetall(keys.result(job.spec.id))):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert Result.from_fields(fields).meta.status == 503


def _send_until(client, jpeg: bytes, images: str, tries: int = 40):
    """Requests until one went as `images` (the API learns the workers' formats from
    their heartbeats within a monitor period); its answer."""
    for _ in range(tries):
        before = metric(client.get("/metrics").text, "cleandift_job_image_bytes_count",
                        images=images)
        response = client.post("/features", files={"image": ("p.jpg", jpeg)},
                               data={"layers": "us6"}, params={"format": "safetensors"})
        assert response.status_code == 200, response.text
        text = client.get("/metrics").text
        if metric(text, "cleandift_job_image_bytes_count", images=images) > before:
            return response, text
        time.sleep(0.1)
    raise AssertionError(f"no job went as {images}")


@pytest.mark.integration
def test_the_service_sends_uploads_and_answers_as_before(settings, extractor, jpeg):
    from cleandift.client.tensors import read_safetensors

    with running_service(settings, extractor) as (client, _):
        response, text = _send_until(client, jpeg, "uploads")
        bad = client.post("/features", files={"image": ("b.jpg", jpeg[: len(jpeg) // 2])},
                          data={"layers": "us6"})
    assert metric(text, "cleandift_job_image_bytes_sum", images="uploads") >= len(jpeg)
    got = read_safetensors(response.content)[0]["us6"].astype(np.float32)
    want = expected_features(extractor, jpeg, ["us6"])["us6"].numpy()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)  # float16 rounding
    assert bad.status_code == 400 and bad.headers["content-type"].startswith(
        "application/problem+json") and "image: the image data is corrupt" in bad.text


@pytest.mark.integration
def test_the_api_decodes_while_a_worker_cannot_read_uploads(settings, extractor, jpeg):
    """An older worker among the live ones (its heartbeat says v1-v3): pixels travel."""
    keys, r = Keys(settings.queue_prefix), redis_client(settings)
    old = Heartbeat(id="old-worker", pid=1, host="h", model="m", version="v", device="cpu",
                    started_at=time.time(), protocols=[1, 2, 3])
    r.set(keys.worker(old.id), old.model_dump_json(), ex=60)
    r.zadd(keys.workers, {old.id: time.time() + 60})
    with running_service(settings, extractor) as (client, _):
        time.sleep(0.5)  # two monitor periods: the API has read both heartbeats
        _send_until(client, jpeg, "pixels", tries=1)
    r.delete(keys.worker(old.id))


@pytest.mark.integration
def test_decode_at_api_keeps_pixels_in_the_queue(settings, extractor, jpeg):
    settings = settings.model_copy(update={"decode_at": "api"})
    with running_service(settings, extractor) as (client, _):
        time.sleep(0.5)
        _, text = _send_until(client, jpeg, "pixels", tries=1)
    assert metric(text, "cleandift_job_image_bytes_count", images="uploads") == 0
