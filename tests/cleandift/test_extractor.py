import pytest
import torch

from cleandift.contract import InvalidSizeError, check_size
from cleandift.layers import unet_features


def test_batch_equals_single_calls(extractor, photo, photo2):
    layers = ["mid", "us6", "us10"]
    batch = extractor.extract([photo, photo2, photo], layers=layers)
    for image, got in zip([photo, photo2, photo], batch):
        single = extractor.extract([image], layers=layers)[0]
        for key in layers:
            # Batched conv kernels sum in another order: equal up to float rounding.
            torch.testing.assert_close(got[key], single[key], rtol=1e-3, atol=1e-4)


def test_fp32_is_deterministic(extractor, photo):
    a = extractor.extract([photo], layers=["us6", "us9"])[0]
    b = extractor.extract([photo], layers=["us6", "us9"])[0]
    for key in a:
        assert torch.equal(a[key], b[key])


def test_size_is_per_call(extractor, photo):
    feats = extractor.extract([photo], layers=["us6"], size=128)[0]
    assert feats["us6"].shape[-1] == 128 // 16
    with pytest.raises(InvalidSizeError):
        extractor.extract([photo], size=100)
    with pytest.raises(InvalidSizeError):
        check_size(2048, hi=1024)


def test_clean_mode_uses_latent_mean_and_student_timestep(extractor, photo):
    pixels = extractor.preprocess([photo])
    with torch.inference_mode():
        latents = extractor.vae.encode(pixels).latent_dist.mean * 0.18215
        context = extractor.prompts("")
        t = torch.full((1,), extractor.info.student_timestep)
        expected = unet_features(extractor.unet, latents, t, context, ["us6"])["us6"]
    got = extractor.features(pixels, ["us6"])["us6"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_dift_mode_equals_hand_computation(extractor, photo, photo2):
    seeds, ensemble, t = [11, 12], 4, 261
    pixels = extractor.preprocess([photo, photo2])
    got = extractor.features(pixels, ["us6"], mode="dift", ensemble=ensemble, seeds=seeds)["us6"]
    with torch.inference_mode():
        posterior = extractor.vae.encode(pixels).latent_dist
        context = extractor.prompts("")
        for i, seed in enumerate(seeds):
            gen = torch.Generator().manual_seed(seed)
            shape = (ensemble, *posterior.mean.shape[1:])
            z = (posterior.mean[i] + posterior.std[i] * torch.randn(shape, generator=gen)) * 0.18215
            noise = torch.randn(shape, generator=gen)
            alpha = extractor.noise_scheduler.alphas_cumprod[t]
            noisy = alpha.sqrt() * z + (1 - alpha).sqrt() * noise
            ts = torch.full((ensemble,), t)
            feats = unet_features(extractor.unet, noisy, ts, context, ["us6"])["us6"]
            torch.testing.assert_close(got[i], feats.mean(0), rtol=1e-4, atol=1e-5)


def test_dift_differs_from_clean(extractor, photo):
    clean = extractor.extract([photo], layers=["us6"])[0]["us6"]
    dift = extractor.extract([photo], layers=["us6"], mode="dift", seeds=[0])[0]["us6"]
    assert not torch.allclose(clean, dift)
    with pytest.raises(ValueError, match="mode"):
        extractor.extract([photo], mode="noisy")


def test_prompt_changes_features_and_loads_text_encoder_lazily(demo_dir, photo):
    from cleandift import load_extractor

    ex = load_extractor(demo_dir, device="cpu")
    empty = ex.extract([photo], layers=["us6"])[0]["us6"]
    assert not ex.prompts.text_encoder_loaded  # the empty prompt is read from the folder
    cat = ex.extract([photo], layers=["us6"], prompt="a photo of a cat")[0]["us6"]
    assert ex.prompts.text_encoder_loaded
    assert not torch.allclose(empty, cat)


@pytest.mark.slow  # torch.compile: about 25 s here
def test_compiled_blocks_keep_the_read_out_and_the_early_stop(demo_dir, cache_dir, photo):
    """Dynamo traces every block (the "eager" backend skips code generation, which the
    GPU script measures); the hooks, the truncation and the features stay as they were."""
    from cleandift import load_extractor
    from cleandift.optimize import compile_extractor

    plain = load_extractor(demo_dir, device="cpu")
    compiled = load_extractor(demo_dir, device="cpu")
    assert compile_extractor(compiled, cache_dir, backend="eager") > 0
    for batch in ([photo], [photo, photo, photo]):  # batch 1, and a size never warmed up
        want = plain.extract(batch, layers=["us6", "us9"])
        got = compiled.extract(batch, layers=["us6", "us9"])
        for a, b in zip(want, got):
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_dift_stops_between_unet_passes_when_told(extractor, photo):
    """A long DIFT ensemble can be abandoned (its deadline passed): `should_stop` is asked
    between UNet passes, and the rest of the ensemble never runs."""
    from cleandift.extractor import Stopped
    from cleandift.method import DIFT_ENSEMBLE

    pixels = extractor.preprocess([photo] * 4, 64)
    seen: list[int] = []
    hook = extractor.base_unet().register_forward_pre_hook(
        lambda _m, args: seen.append(int(args[0].shape[0])))
    try:
        with pytest.raises(Stopped):
            extractor.features(pixels, ["us6"], mode="dift", should_stop=lambda: bool(seen))
    finally:
        hook.remove()
    assert 0 < sum(seen) < 4 * DIFT_ENSEMBLE
