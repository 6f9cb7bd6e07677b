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
    # An API with no worker ever started answers 503 (no model) with Retry-After: 1.
    with ApiServer(settings) as api, Client(api.url, retries=2) as client:
        start = time.monotonic()
        with pytest.raises(NotReady) as err:
            client.features(photo)
        waited = time.monotonic() - start
    assert err.value.status == 503 and "model" in err.value.detail
    assert waited >= 2.0  # two retries, one second apart
