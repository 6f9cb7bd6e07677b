"""The Python client against the running test service."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cleandift.client import AsyncClient, BadImage, Client, InvalidParameters, NotReady
from tests.corpus import encode
from tests.service.service_helpers import ApiServer, expected_features, running_service

pytestmark = pytest.mark.integration


def test_sync_client_features_correspond_models(settings, extractor, photo, photo2):
    with running_service(settings, extractor) as (http, _), Client(str(http.base_url)) as client:
        feats = client.features(photo, layers=["us6", "mid"])
        want = expected_features(extractor, encode(photo, "PNG"), ["us6", "mid"])
        assert set(feats) == {"us6", "mid"} and feats["us6"].dtype == np.float16
        np.testing.assert_allclose(feats["us6"], want["us6"].half().numpy(), atol=2e-3)
        f32 = client.features(np.asarray(photo), layers="us6", dtype="float32")["us6"]
        np.testing.assert_allclose(f32, want["us6"].numpy(), atol=1e-4)
        body = client.correspond(photo, photo2, points=[(10, 20), (100.5, 50)])
        assert [m["source"] for m in body["matches"]] == [[10.0, 20.0], [100.5, 50.0]]
        assert client.models()["name"] == "cleandift-demo"
        with pytest.raises(InvalidParameters) as err:
            client.features(photo, layers="us99")
        assert err.value.status == 422 and "us99" in err.value.detail
        with pytest.raises(BadImage):
            client.features(b"not an image")


def test_async_client(settings, extractor, photo, photo2):
    with running_service(settings, extractor) as (http, _):
        async def main():
            async with AsyncClient(str(http.base_url)) as client:
                a, b = await asyncio.gather(client.features(photo), client.features(photo2))
                mutual = await client.correspond(photo, photo2, max_matches=3)
                return a, b, mutual

        a, b, mutual = asyncio.run(main())
    assert a["us6"].shape == b["us6"].shape == (64, 16, 16)
    assert len(mutual["matches"]) == 3


def test_retries_honour_retry_after_then_raise(settings, photo):
    # An API with no worker ever started answers 503 (no worker) with Retry-After: 1.
    with ApiServer(settings) as api, Client(api.url, retries=2, retry_budget_s=0) as client:
        start = time.monotonic()
        with pytest.raises(NotReady) as err:
            client.features(photo)
        waited = time.monotonic() - start
    assert err.value.status == 503 and "worker" in err.value.detail
    assert waited >= 2.0  # two retries, one second apart


def test_the_default_retry_budget_rides_through_a_worker_restart(settings, extractor, photo):
    """No worker for ~6 s (a restart under serve takes ~15 s): new requests get 503 with
    Retry-After meanwhile; the client keeps retrying within its time budget (what
    `extract-dataset --service` relies on) instead of giving up after a few seconds."""
    import threading

    from tests.service.service_helpers import WorkerThread

    with WorkerThread(settings, extractor):  # the model description reaches Redis
        pass
    with ApiServer(settings) as api, Client(api.url) as client:
        late = WorkerThread(settings, extractor)
        timer = threading.Timer(6.0, late.__enter__)
        timer.start()
        try:
            feats = client.features(photo, layers="us6")
        finally:
            timer.join()
            late.__exit__()
    assert feats["us6"].shape == (64, 16, 16)


def test_client_outputs_targets_and_many(cached_settings, extractor, photo, photo2):
    from cleandift.client import Features
    from tests.corpus import textured_image

    with (running_service(cached_settings, extractor) as (http, _),
          Client(str(http.base_url)) as client):
        full = client.features(photo, layers="us6", dtype="float32")
        assert isinstance(full, Features) and full.model_version == "demo-seed0"
        assert full.layout == "map" and full.image_size == photo.size and not full.cached
        points = client.features(photo, layers="us6", points=[(10, 20), (100.5, 50)])
        assert points.layout == "points" and points["us6"].shape == (2, 64)
        int8 = client.features(photo, layers="us6", dtype="int8")  # dequantized for us
        assert int8["us6"].dtype == np.float32 and set(int8) == {"us6"} and int8.cached
        cosine = (int8["us6"] * full["us6"]).sum(0) / (
            np.linalg.norm(int8["us6"], axis=0) * np.linalg.norm(full["us6"], axis=0))
        assert cosine.mean() > 0.999
        raw = client.features(photo, layers="us6", dtype="int8", raw=True)
        assert raw["us6"].dtype == np.int8 and raw["us6.scale"].shape == (64,)
        grid = client.features(photo, layers="us6", grid=2, dtype="bfloat16")
        assert grid["us6"].shape == (64, 2, 2) and grid["us6"].dtype == np.float32
        body = client.correspond(photo, targets=[photo2, photo], points=[(10, 20)])
        assert len(body["results"]) == 2
        images = [textured_image(40 + 10 * i, 30, seed=i) for i in range(5)]
        many = client.features_many(images, concurrency=3, layers="us6")
        assert [f.image_size for f in many] == [im.size for im in images]


def test_wait_ready_and_connection_retries(settings, extractor, photo):
    import threading

    from cleandift.service.processes.redis_server import free_port
    from tests.service.service_helpers import WorkerThread

    with WorkerThread(settings, extractor):  # the model description reaches Redis
        pass
    late = settings.model_copy(update={"port": free_port()})
    server = ApiServer(late)
    server.port, server.url = late.port, f"http://127.0.0.1:{late.port}"
    import uvicorn

    from cleandift.service.api.app import create_app

    server.server = uvicorn.Server(uvicorn.Config(create_app(late), host="127.0.0.1",
                                                  port=late.port, log_level="warning"))
    server.server.install_signal_handlers = lambda: None
    server.thread = threading.Thread(target=server.server.run, daemon=True)
    threading.Timer(0.6, server.thread.start).start()  # nothing listens for 0.6 s
    with Client(server.url, retries=6, backoff=0.2) as client:
        assert client.models()["name"] == "cleandift-demo"  # after refused connections
        with WorkerThread(late, extractor):
            assert client.wait_ready(timeout=30)["status"] == "ready"
    server.__exit__()
