"""The two built-in small models, `demo` (SD2.1-shaped) and `demo15` (SD1.5-shaped), are
genuinely different models: other name, channels, strides, VAE factor and scheduler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cleandift.demo import METADATA_FILE
from cleandift.loading import load_extractor, resolve_spec
from cleandift.method import LAYER_KEYS


@pytest.fixture(scope="module")
def demo(cache_dir):
    return load_extractor("demo", device="cpu", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def demo15(cache_dir):
    return load_extractor("demo15", device="cpu", cache_dir=cache_dir)


def _metadata(extractor) -> dict:
    return json.loads((Path(extractor.base_spec) / METADATA_FILE).read_text())


def test_demo15_is_sd15_shaped(demo15):
    assert tuple(demo15.info.layers) == LAYER_KEYS
    unet = demo15.unet.config
    assert len(demo15.unet.down_blocks) == 4 and len(demo15.unet.up_blocks) == 4
    assert not unet.use_linear_projection and not unet.upcast_attention
    assert demo15.noise_scheduler.config.prediction_type == "epsilon"
    folder = Path(demo15.base_spec)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler" and scheduler["skip_prk_steps"]
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert text["hidden_act"] == "quick_gelu"
    assert text["hidden_size"] == unet.cross_attention_dim
    assert demo15.latent_factor == 4  # a 3-block VAE


def test_demo15_differs_from_demo(demo, demo15):
    assert tuple(demo.info.layers) == tuple(demo15.info.layers) == LAYER_KEYS
    assert demo.noise_scheduler.config.prediction_type == "v_prediction"
    assert demo15.info.input_size != demo.info.input_size
    assert demo15.latent_factor != demo.latent_factor
    channels = {k: (demo.info.layers[k].channels, demo15.info.layers[k].channels)
                for k in LAYER_KEYS}
    assert any(a != b for a, b in channels.values()), channels
    for key in LAYER_KEYS:  # every layer has its own stride
        assert demo.info.layers[key].stride != demo15.info.layers[key].stride, key
    assert demo.info.name == "cleandift-demo" and demo15.info.name == "cleandift-demo15"
    assert demo.base_spec != demo15.base_spec
    assert _metadata(demo)["name"] == demo.info.name
    assert _metadata(demo15)["name"] == demo15.info.name
    assert _metadata(demo15)["input_size"] == demo15.info.input_size


def test_demo15_features_have_the_declared_shapes(demo15, photo):
    size = demo15.info.input_size
    (features,) = demo15.extract([photo], layers=list(LAYER_KEYS))
    assert list(features) == list(LAYER_KEYS)
    for key, tensor in features.items():
        layer = demo15.info.layers[key]
        side = size // layer.stride
        assert tuple(tensor.shape) == (layer.channels, side, side), key
        assert torch.isfinite(tensor).all(), key
    (small,) = demo15.extract([photo], layers=["us6"], size=128)
    stride = demo15.info.layers["us6"].stride
    assert tuple(small["us6"].shape) == (demo15.info.layers["us6"].channels,
                                         128 // stride, 128 // stride)


def test_specs_name_the_built_in_models(cache_dir):
    assert resolve_spec(None, cache_dir).name == "cleandift-demo"
    assert resolve_spec("demo", cache_dir).name == "cleandift-demo"
    spec = resolve_spec("demo15", cache_dir)
    assert spec.name == "cleandift-demo15" and not spec.is_hub
    assert Path(spec.source).name == "cleandift-demo15-seed0"
