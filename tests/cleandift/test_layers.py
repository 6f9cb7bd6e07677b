import pytest
import torch

from cleandift.architectures import SD15, SD21
from cleandift.contract import UnknownLayerError, validate_layers
from cleandift.layers import capture, probe_layers, unet_features
from cleandift.method import LAYER_KEYS, LAYER_MODULES

# METHOD.md: channels and spatial side at s = 768 (SD2.1); sides scale with s.
METHOD_TABLE = {
    "mid": (1280, 12), "us1": (1280, 12), "us2": (1280, 12), "us3": (1280, 24),
    "us4": (1280, 24), "us5": (1280, 24), "us6": (1280, 48), "us7": (640, 48),
    "us8": (640, 48), "us9": (640, 96), "us10": (320, 96),
}


@pytest.mark.parametrize("arch", [SD21, SD15], ids=["sd21", "sd15"])
def test_real_architectures_have_the_method_shapes(arch):
    """Built on the meta device: the full-size UNet costs no memory here."""
    layers = probe_layers(arch.unet, arch.input_size, 8)
    assert list(layers) == list(LAYER_KEYS)
    for key, (channels, side_at_768) in METHOD_TABLE.items():
        side = side_at_768 * arch.input_size // 768
        assert layers[key].channels == channels, key
        assert layers[key].stride == arch.input_size // side, key


def test_demo_model_shapes(extractor, photo):
    feats = extractor.extract([photo], layers=list(LAYER_KEYS))[0]
    size = extractor.info.input_size
    for key, info in extractor.info.layers.items():
        assert feats[key].shape == (info.channels, size // info.stride, size // info.stride)
    assert feats["us6"].shape[-1] == size // 16


def test_validate_layers_orders_and_rejects():
    assert validate_layers(["us10", "mid", "us6", "us6"], []) == ["mid", "us6", "us10"]
    assert validate_layers(None, ["us6"]) == ["us6"]
    with pytest.raises(UnknownLayerError, match="us11"):
        validate_layers(["us11"], [])
    with pytest.raises(UnknownLayerError):
        validate_layers([], ["us6"])


def _inputs(unet, n=2, side=32):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 4, side, side, generator=gen)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    return latents, torch.full((n,), 261.0), context


def test_truncated_equals_full_forward(extractor):
    unet = extractor.unet
    latents, t, context = _inputs(unet)
    with torch.inference_mode():
        full = {}
        handles = [
            unet.get_submodule(path).register_forward_hook(
                lambda _m, _i, out, key=key: full.__setitem__(
                    key, out if isinstance(out, torch.Tensor) else out[0]
                )
            )
            for key, path in LAYER_MODULES.items()
        ]
        unet(latents, t, encoder_hidden_states=context.expand(2, -1, -1))
        for handle in handles:
            handle.remove()
        for keys in (["mid"], ["us3", "us6"], list(LAYER_KEYS)):
            got = unet_features(unet, latents, t, context, keys)
            for key in keys:
                torch.testing.assert_close(got[key], full[key], rtol=0, atol=0)


@pytest.mark.parametrize("last", ["mid", "us6", "us9"])
def test_blocks_after_the_last_key_never_run(extractor, last):
    unet = extractor.unet
    latents, t, context = _inputs(unet, n=1)
    ran = []
    later = {
        "mid": ["up_blocks.0", "up_blocks.1", "up_blocks.3", "conv_out"],
        "us6": ["up_blocks.2", "up_blocks.3", "conv_norm_out", "conv_out"],
        "us9": ["up_blocks.3", "conv_out"],
    }[last]
    handles = [
        unet.get_submodule(name).register_forward_pre_hook(lambda *_a, n=name: ran.append(n))
        for name in later
    ]
    try:
        with torch.inference_mode():
            unet_features(unet, latents, t, context, [last])
    finally:
        for handle in handles:
            handle.remove()
    assert ran == []


def test_capture_is_per_thread_and_installs_one_hook(extractor):
    import threading

    unet = extractor.unet
    latents, t, context = _inputs(unet, n=1)
    with torch.inference_mode():
        alone = {k: unet_features(unet, latents, t, context, [k])[k] for k in ("mid", "us9")}
    results, errors = {}, []

    def run(key):
        try:
            with torch.inference_mode():
                for _ in range(5):
                    results[key] = unet_features(unet, latents, t, context, [key])[key]
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in ("mid", "us9")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for key, value in alone.items():
        torch.testing.assert_close(results[key], value)
    assert len(unet.up_blocks[1]._forward_hooks) == 1
    with capture(unet, ["us6"]):
        pass
    assert len(unet.up_blocks[1]._forward_hooks) == 1
