"""What the stages cannot do, or would do for too long, is refused at the API (422) and
never reaches a worker: empty points, requests over the per-job cost ceiling."""

from __future__ import annotations

import json

import pytest

from cleandift.service.queue.keys import Keys
from tests.corpus import encode, textured_image
from tests.service.service_helpers import redis_client, running_service

pytestmark = pytest.mark.integration
SMALL = encode(textured_image(64, 48, 4), "PNG")


def _nothing_reached_a_worker(settings, threads) -> None:
    assert redis_client(settings).xlen(Keys(settings.queue_prefix).jobs) == 0
    assert sum(t.worker.metrics.value("cleandift_images_processed_total")
               for t in threads) == 0


def test_empty_points_are_refused_at_the_api(settings, extractor):
    with running_service(settings, extractor) as (client, threads):
        form = client.post("/features", files={"image": SMALL}, data={"points": "[]"})
        body = client.post("/features", json={"image": "", "points": []})
        pair = client.post("/correspond", files={"source": SMALL, "target": SMALL},
                           data={"points": "[]"})
        _nothing_reached_a_worker(settings, threads)
    assert form.status_code == 422 and "points" in form.json()["detail"], form.text
    assert pair.status_code == 422 and "points" in pair.json()["detail"], pair.text
    assert body.status_code in (400, 422)


def test_the_costliest_requests_are_refused_with_the_ceiling_named(settings, extractor):
    """mode=dift, 16 targets at size 1024 is ~136 UNet passes: over the per-job ceiling
    that /v1/models states; the message says what it costs and what the limit is."""
    files = [("source", ("s.png", SMALL))] + [("target", (f"t{i}.png", SMALL))
                                              for i in range(16)]
    points = json.dumps([[1.0 + i % 60, 1.0 + i % 40] for i in range(1000)])
    with running_service(settings, extractor) as (client, threads):
        limits = client.get("/v1/models").json()["limits"]
        costly = client.post("/correspond", files=files,
                             data={"mode": "dift", "size": "1024", "points": points})
        dift_map = client.post("/features", files={"image": SMALL},
                               data={"mode": "dift", "size": "1024", "layers": "us10"})
        assert redis_client(settings).xlen(Keys(settings.queue_prefix).jobs) == 0
        plain = client.post("/features", files={"image": SMALL})
    assert limits["max_job_cost"] == settings.max_job_cost > 0
    assert costly.status_code == 422, costly.text
    detail = costly.json()["detail"]
    assert "cost" in detail and str(settings.max_job_cost).rstrip("0").rstrip(".") in detail
    assert dift_map.status_code == 422, dift_map.text
    assert plain.status_code == 200


def test_the_cost_is_refused_before_any_image_is_decoded(settings, extractor):
    """The ceiling needs no pixels: a costly request is refused without decoding its
    images (here they are not even images, which would otherwise be a 400)."""
    junk = b"not an image" * 100
    with running_service(settings, extractor) as (client, _):
        costly = client.post("/features", files={"image": junk},
                             data={"mode": "dift", "size": "1024", "layers": "us10"})
        cheap = client.post("/features", files={"image": junk})
    assert costly.status_code == 422 and "cost" in costly.json()["detail"], costly.text
    assert cheap.status_code == 400
