"""Features, not bytes: descriptors at points, pooled grids, bfloat16 and int8 answers,
and one source against several targets, each checked against the core extractor's maps
reduced by hand."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cleandift.client.tensors import bfloat16_to_float32, dequantize_int8, read_safetensors
from cleandift.matching import sample_points
from tests.corpus import encode
from tests.service.service_helpers import expected_features

pytestmark = pytest.mark.integration
POINTS = [[10.0, 20.0], [0.0, 0.0], [319.0, 239.0], [150.5, 99.25]]


def features(client, data: bytes, fmt: str = "safetensors", **fields):
    params = {"format": fmt}
    if "dtype" in fields:
        params["dtype"] = fields.pop("dtype")
    return client.post("/features", files={"image": ("x.jpg", data)}, data=fields,
                       params=params)


def test_descriptors_at_points_in_every_format(service, extractor, jpeg):
    full = expected_features(extractor, jpeg, ["us6", "us9"])
    want = {k: sample_points(v, torch.tensor(POINTS), (320, 240)).numpy()
            for k, v in full.items()}
    answer = features(service, jpeg, layers="us6,us9", points=json.dumps(POINTS))
    arrays, metadata, _ = read_safetensors(answer.content)
    assert metadata["layout"] == "points"
    for key in want:
        assert arrays[key].shape == (len(POINTS), full[key].shape[0])
        np.testing.assert_allclose(arrays[key], want[key], atol=2e-3)
    body = features(service, jpeg, "json", layers="us6", points=json.dumps(POINTS)).json()
    info = body["features"]["us6"]
    got = np.frombuffer(base64.b64decode(info["data"]), "<f2").reshape(info["shape"])
    assert body["layout"] == "points" and info["shape"] == [4, 64]
    np.testing.assert_allclose(got, want["us6"], atol=2e-3)
    npy = np.load(io.BytesIO(features(service, jpeg, "npy", layers="us6",
                                      points=json.dumps(POINTS)).content))
    np.testing.assert_allclose(npy, want["us6"], atol=2e-3)
    assert len(answer.content) < len(features(service, jpeg, layers="us6,us9").content) / 10


def test_maps_pooled_to_a_grid(service, extractor, jpeg):
    full = expected_features(extractor, jpeg, ["us6"])["us6"]
    answer = features(service, jpeg, layers="us6", grid="4", dtype="float32")
    arrays, metadata, _ = read_safetensors(answer.content)
    assert metadata["layout"] == "grid" and arrays["us6"].shape == (64, 4, 4)
    np.testing.assert_allclose(arrays["us6"], F.adaptive_avg_pool2d(full[None], 4)[0].numpy(),
                               atol=1e-5)


def test_bfloat16_and_int8_answers(service, extractor, jpeg):
    full = expected_features(extractor, jpeg, ["us6"])["us6"].numpy()
    arrays, _, dtypes = read_safetensors(features(service, jpeg, layers="us6",
                                                  dtype="bfloat16").content)
    assert dtypes["us6"] == "BF16"
    np.testing.assert_allclose(bfloat16_to_float32(arrays["us6"]), full, rtol=1e-2, atol=1e-2)
    answer = features(service, jpeg, layers="us6", dtype="int8")
    arrays, metadata, dtypes = read_safetensors(answer.content)
    assert dtypes == {"us6": "I8", "us6.scale": "F32"} and "per channel" in metadata["quantization"]
    restored = dequantize_int8(arrays["us6"], arrays["us6.scale"], channel_axis=0)
    cosine = (restored * full).sum(0) / (np.linalg.norm(restored, axis=0)
                                         * np.linalg.norm(full, axis=0))
    assert cosine.mean() > 0.999 and cosine.min() > 0.99
    float16 = features(service, jpeg, layers="us6")
    assert len(float16.content) / len(answer.content) > 1.9  # (the scales cost 4 B/channel)
    json_body = features(service, jpeg, "json", layers="us6", dtype="int8").json()
    assert set(json_body["features"]) == {"us6", "us6.scale"}


@pytest.mark.parametrize("bad", [
    {"points": json.dumps(POINTS), "grid": "2"},
    {"grid": "1000"},
    {"points": "[[5000, 1]]"},
    {"dtype": "int8", "fmt": "npy"},
    {"dtype": "bfloat16", "fmt": "npy"},
    {"dtype": "int4"},
])
def test_inconsistent_output_requests_get_422(service, jpeg, bad):
    bad = dict(bad)
    fmt = bad.pop("fmt", "safetensors")
    response = features(service, jpeg, fmt, layers="us6", **bad)
    assert response.status_code == 422, response.text


def test_one_source_against_several_targets(service, jpeg, photo2):
    targets = [encode(photo2, "PNG"), encode(photo2.rotate(90, expand=True), "PNG"), jpeg]
    files = [("source", ("s.jpg", jpeg))] + [("target", (f"t{i}.png", t))
                                            for i, t in enumerate(targets)]
    data = {"points": json.dumps(POINTS[:2]), "heatmap": "true"}
    several = service.post("/correspond", files=files, data=data).json()
    assert len(several["results"]) == 3 and "matches" not in several
    for target, result in zip(targets, several["results"]):
        one = service.post("/correspond", files={"source": jpeg, "target": target},
                           data=data).json()
        # The same matches; scores to float32 rounding (one batch of 4 images vs of 2).
        assert [(m["source"], m["target"]) for m in result["matches"]] == \
            [(m["source"], m["target"]) for m in one["matches"]]
        assert [m["score"] for m in result["matches"]] == pytest.approx(
            [m["score"] for m in one["matches"]], abs=1e-5)
        assert np.allclose(np.asarray(result["heatmap"]["values"]),
                           np.asarray(one["heatmap"]["values"]), atol=1e-4)
    as_json = service.post("/correspond", json={
        "source": base64.b64encode(jpeg).decode(), "points": POINTS[:2],
        "targets": [base64.b64encode(t).decode() for t in targets]}).json()
    assert [r["matches"] for r in as_json["results"]] == [r["matches"]
                                                         for r in several["results"]]
