"""End to end over HTTP: formats, correspondence, JSON bodies and the error contract."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from pydantic import SecretStr
from safetensors.numpy import load as load_safetensors

from tests.corpus import bad_images, encode, png_bomb
from tests.service.service_helpers import expected_features, running_service

pytestmark = pytest.mark.integration


def post_features(client, data: bytes, **fields):
    params = {k: fields.pop(k) for k in ("format", "dtype") if k in fields}
    headers = fields.pop("headers", {})
    return client.post("/features", files={"image": ("x.jpg", data, "image/jpeg")},
                       data=fields, params=params, headers=headers)


def test_every_format_decodes_to_the_core_extractor_arrays(service, extractor, jpeg):
    expected = expected_features(extractor, jpeg, ["us6", "mid", "us10"])
    body = post_features(service, jpeg, layers="us6,mid,us10").json()
    assert body["image"] == {"width": 320, "height": 240} and body["input_size"] == 256
    assert body["model"] == "cleandift-demo" and body["model_version"] == "demo-seed0"
    assert set(body["timings_ms"]) >= {"queue", "inference"}
    for key, want in expected.items():
        info = body["features"][key]
        got = np.frombuffer(base64.b64decode(info["data"]), "<f2").reshape(info["shape"])
        assert info["dtype"] == "float16" and list(want.shape) == info["shape"]
        np.testing.assert_allclose(got, want.half().numpy(), rtol=0, atol=2e-3)

    st = post_features(service, jpeg, layers="us6,mid,us10",
                       headers={"Accept": "application/x-safetensors"})
    assert st.headers["content-type"] == "application/x-safetensors"
    arrays = load_safetensors(st.content)
    for key, want in expected.items():
        assert arrays[key].dtype == np.float16
        np.testing.assert_allclose(arrays[key], want.half().numpy(), atol=2e-3)

    f32 = post_features(service, jpeg, layers="us6", format="safetensors", dtype="float32")
    np.testing.assert_allclose(load_safetensors(f32.content)["us6"], expected["us6"].numpy(),
                               atol=1e-4)

    npy = post_features(service, jpeg, layers="us10", format="npy")
    assert npy.headers["content-type"] == "application/x-npy"
    array = np.load(io.BytesIO(npy.content))
    np.testing.assert_allclose(array, expected["us10"].half().numpy(), atol=2e-3)
    assert post_features(service, jpeg, layers="us6,us9", format="npy").status_code == 422


def test_safetensors_metadata(service, jpeg):
    from safetensors import safe_open

    st = post_features(service, jpeg, format="safetensors")
    path = io.BytesIO(st.content)
    header_len = int.from_bytes(path.read(8), "little")
    meta = json.loads(path.read(header_len))["__metadata__"]
    assert meta == {"model": "cleandift-demo", "model_version": "demo-seed0",
                    "image_width": "320", "image_height": "240", "input_size": "256",
                    "layout": "map"}
    assert safe_open  # the format is the one safetensors reads (checked above)


def test_json_body_variant_equals_multipart(service, jpeg):
    multipart = post_features(service, jpeg, layers="us6").json()
    body = {"image": base64.b64encode(jpeg).decode(), "layers": ["us6"], "size": 256}
    as_json = service.post("/features", json=body).json()
    assert as_json["features"]["us6"]["data"] == multipart["features"]["us6"]["data"]


def test_correspond_with_and_without_points(service, extractor, jpeg, photo, photo2):
    target = encode(photo2, "PNG")
    files = {"source": ("a.jpg", jpeg), "target": ("b.png", target)}
    with_points = service.post("/correspond", files=files,
                               data={"points": "[[10, 20], [200.5, 100]]"}).json()
    assert [m["source"] for m in with_points["matches"]] == [[10.0, 20.0], [200.5, 100.0]]
    for m in with_points["matches"]:
        assert 0 <= m["target"][0] <= 299 and 0 <= m["target"][1] <= 279
        assert -1 <= m["score"] <= 1
    # Same answer as the core matcher on the core extractor's features.
    from cleandift.matching import match_points

    src = expected_features(extractor, jpeg, ["us6"])["us6"]
    tgt = expected_features(extractor, target, ["us6"])["us6"]
    core = match_points(src, tgt, [[10, 20], [200.5, 100]], (320, 240), (300, 280))
    assert [list(m.target) for m in core] == [m["target"] for m in with_points["matches"]]

    mutual = service.post("/correspond", files=files, data={"max_matches": "7"}).json()
    assert 0 < len(mutual["matches"]) <= 7
    scores = [m["score"] for m in mutual["matches"]]
    assert scores == sorted(scores, reverse=True)

    as_json = service.post("/correspond", json={
        "source": base64.b64encode(jpeg).decode(), "target": base64.b64encode(target).decode(),
        "points": [[10, 20], [200.5, 100]]}).json()
    assert as_json["matches"] == with_points["matches"]


def test_models_health_and_docs(service):
    models = service.get("/v1/models").json()
    assert models["correspondence_layer"] == "us6" and models["layers"]["us6"]["stride"] == 16
    assert service.get("/healthz").status_code == 200
    assert service.get("/metrics/workers").status_code == 200  # no key configured: open
    schema = service.get("/openapi.json").json()
    content = schema["paths"]["/features"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)


def test_every_header_the_schema_promises_comes_with_the_answer(service, jpeg, photo2):
    """The OpenAPI 200 of each job route names its headers (the stage timings included),
    and a real answer carries each one."""
    schema = service.get("/openapi.json").json()
    target = encode(photo2, "PNG")
    answers = {"/features": service.post("/features", files={"image": jpeg}),
               "/correspond": service.post("/correspond", files={"source": jpeg,
                                                                 "target": target})}
    for route, answer in answers.items():
        assert answer.status_code == 200, answer.text
        declared = schema["paths"][route]["post"]["responses"]["200"]["headers"]
        assert {"X-Timing-Queue-Ms", "X-Timing-Total-Ms"} <= set(declared)
        missing = [h for h in declared if h.lower() not in answer.headers]
        assert not missing, f"{route}: declared but not sent: {missing}"


def problem(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert set(body) >= {"type", "title", "status", "detail"} and body["status"] == status
    return body


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_images_get_400(service, name):
    problem(post_features(service, bad_images()[name]), 400)


def test_error_contract(service, jpeg, settings):
    problem(post_features(service, png_bomb()), 413)
    problem(service.post("/features", content=b"x" * (settings.max_body_bytes + 1),
                         headers={"content-type": "application/json"}), 413)
    problem(service.post("/features", content=b"hello", headers={"content-type": "text/plain"}),
            415)
    problem(post_features(service, jpeg, layers="us6,us42"), 422)
    problem(post_features(service, jpeg, size="100"), 422)
    problem(post_features(service, jpeg, size="4096"), 422)
    problem(post_features(service, jpeg, format="xml"), 422)
    problem(post_features(service, jpeg, prompt="x" * (settings.max_prompt_chars + 1)), 422)
    problem(service.post("/features", files={"layers": (None, "us6")}), 422)  # no image
    problem(service.post("/features", content=b"{not json",
                         headers={"content-type": "application/json"}), 400)
    problem(service.post("/features", json={"image": "%%%not-base64"}), 400)
    problem(service.post("/features", json={"image": "aGk=", "bogus": 1}), 422)
    files = {"source": ("a.jpg", jpeg), "target": ("b.jpg", jpeg)}
    for points in ("[[1, 2", "[[1e6, 2]]", "[[NaN, 2]]", "[[1]]", json.dumps([[1, 1]] * 2000)):
        problem(service.post("/correspond", files=files, data={"points": points}), 422)
    problem(service.post("/correspond", files=files, data={"layer": "us0"}), 422)
    problem(service.get("/nope"), 404)
    # After all that, the service still answers good requests identically.
    assert post_features(service, jpeg).status_code == 200
    assert service.get("/readyz").status_code == 200


def test_api_key(settings, extractor, jpeg):
    keyed = settings.model_copy(update={"api_key": SecretStr("s3cret")})
    with running_service(keyed, extractor) as (client, _):
        problem(post_features(client, jpeg), 401)
        problem(post_features(client, jpeg, headers={"Authorization": "Bearer nope"}), 401)
        problem(client.get("/v1/models"), 401)
        assert post_features(client, jpeg, headers={"Authorization": "Bearer s3cret"}).is_success
        assert post_features(client, jpeg, headers={"X-API-Key": "s3cret"}).is_success
        for open_path in ("/healthz", "/readyz", "/readyz/api", "/metrics", "/"):
            assert client.get(open_path).status_code == 200
        problem(client.get("/metrics/workers"), 401)  # names every worker: behind the key
        workers = client.get("/metrics/workers", headers={"X-API-Key": "s3cret"})
        assert workers.status_code == 200 and "cleandift_" in workers.text


def test_features_tensor_helper_is_the_core_path(extractor, jpeg):
    got = expected_features(extractor, jpeg, ["us6"])["us6"]
    assert isinstance(got, torch.Tensor) and got.shape == (64, 16, 16)


def test_results_through_redis_equal_results_fetched_from_the_worker(settings, extractor, jpeg):
    """`result_transport=redis` (every result inline through Redis) answers the same bytes
    as the direct path the other tests use."""
    direct = None
    with running_service(settings, extractor) as (client, threads):
        direct = post_features(client, jpeg, layers="us6,us9", format="safetensors").content
        assert len(threads[0].worker.results) == 0  # fetched, hence dropped
    inline = settings.model_copy(update={"result_transport": "redis"})
    with running_service(inline, extractor) as (client, _):
        through_redis = post_features(client, jpeg, layers="us6,us9", format="safetensors")
    assert through_redis.content == direct


def test_a_result_its_worker_cannot_deliver_is_computed_again(settings, extractor, jpeg):
    with running_service(settings, extractor) as (client, threads):
        worker = threads[0].worker
        real_take, lost = worker.results.take, []

        def lose_the_first(job_id, token):
            if not lost:
                lost.append(job_id)
                real_take(job_id, token)
                return None  # as if the worker had died with it
            return real_take(job_id, token)

        worker.results.take = lose_the_first
        response = post_features(client, jpeg, layers="us6", format="safetensors")
        images = worker.metrics.value("cleandift_images_processed_total")
    assert response.status_code == 200 and lost
    assert images == 2  # computed twice for one answer
