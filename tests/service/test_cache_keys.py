"""The feature cache's key and the answer's ETag cover every input that changes the
answer's bytes (docs/cache.md): each input varied alone changes them, and the inputs that
do not change the bytes keep them."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from cleandift.contract import ModelInfo
from cleandift.service.api.answers import ETAG_FIELDS, answer_etag
from cleandift.service.featurecache import image_keys
from cleandift.service.messages import JobSpec

INFO = ModelInfo(name="m", version="v1", base="b", input_size=256, default_layers=["us6"],
                 layers={})
SPEC = JobSpec(kind="features", input_size=256, layers=["us6"], image_sizes=[(300, 200)],
               content=["pixels"])
# One other value for each JobSpec field that changes a features answer.
CHANGES = {"kind": "correspond", "input_size": 512, "layers": ["us6", "us9"],
           "image_sizes": [(900, 600)], "prompt": "a cat", "mode": "dift",
           "dtype": "float32", "points": [(1.0, 2.0)], "grid": 4, "content": ["other"]}
# Fields that do not change the answer's bytes: bookkeeping, or /correspond only.
UNCHANGING = {"max_matches": 5, "heatmap": True, "deadline": 1.0, "reply_to": "x",
              "id": "other-id", "enqueued_at": 2.0, "request_id": "r", "trace": {"a": "b"}}
# What changes the maps a worker computes (the cache key); the rest is read from them.
MAP_INPUTS = {"input_size", "prompt", "mode", "content"}


def model(dtype=torch.float32, device="cpu", **info) -> SimpleNamespace:
    return SimpleNamespace(info=INFO.model_copy(update=info), dtype=dtype,
                           device=torch.device(device))


def test_every_jobspec_field_is_classified():
    assert set(CHANGES) == set(ETAG_FIELDS)
    assert set(CHANGES) | set(UNCHANGING) == set(JobSpec.model_fields)


def test_the_cache_key_changes_with_each_input_of_the_maps_alone():
    base = image_keys(SPEC, model())
    for name, value in CHANGES.items():
        keys = image_keys(SPEC.model_copy(update={name: value}), model())
        if name in MAP_INPUTS:
            assert keys != base, name
        elif name != "image_sizes":  # (sizes must pair with content hashes)
            assert keys == base, name  # read from the same maps: a hit
    for name, value in UNCHANGING.items():
        assert image_keys(SPEC.model_copy(update={name: value}), model()) == base, name
    for other in (model(torch.bfloat16), model(torch.float16), model(name="n"),
                  model(version="v2"), model(device="meta")):
        assert image_keys(SPEC, other) != base, other  # a float32 worker never reads bf16


def test_the_etag_changes_with_each_input_of_the_answer_alone():
    base = answer_etag(SPEC, "m", "v1", "json")
    assert answer_etag(SPEC.model_copy(), "m", "v1", "json") == base
    for name, value in CHANGES.items():
        assert answer_etag(SPEC.model_copy(update={name: value}), "m", "v1", "json") != base, name
    for name, value in UNCHANGING.items():
        assert answer_etag(SPEC.model_copy(update={name: value}), "m", "v1", "json") == base, name
    for other in (("n", "v1", "json"), ("m", "v2", "json"), ("m", "v1", "safetensors")):
        assert answer_etag(SPEC, *other) != base, other


def test_one_solid_colour_at_two_sizes_gets_two_etags():
    """Both resize to the same model-input pixels (one content hash), but the answers
    differ: the image size is in them, and points are read in its pixels."""
    small = SPEC.model_copy(update={"image_sizes": [(300, 200)]})
    large = SPEC.model_copy(update={"image_sizes": [(900, 600)]})
    assert answer_etag(small, "m", "v1", "json") != answer_etag(large, "m", "v1", "json")
