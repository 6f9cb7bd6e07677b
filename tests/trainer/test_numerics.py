"""Training numerics and parity with the official code: fp32 noise and Fourier features
whatever the precision, the global batch, the official full checkpoint, the parity
switches."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cleandift import load_extractor, official, registry
from cleandift.contract import UsageError
from cleandift.trainer.cli import register
from cleandift.trainer.config import TrainConfig
from cleandift.trainer.distill import Student, add_noise, stratified_timesteps
from cleandift.trainer.heads import FourierFeatures
from cleandift.trainer.train import init_from_full, warmup_lr

# The official StableFeatureAligner's state-dict names (CompVis/cleandift,
# src/sd_feature_extraction.py and src/layers.py, configs/sd21_feature_extractor.yaml:
# mapping depth 2, adapters FFNStack depth 3), written out here, not derived from our code.
OFFICIAL_HEAD_PATTERNS = [
    r"time_emb\.weight", r"time_in_proj\.weight", r"mapping\.in_norm\.scale",
    r"mapping\.out_norm\.scale", r"mapping\.blocks\.[01]\.norm\.scale",
    r"mapping\.blocks\.[01]\.up_proj\.weight", r"mapping\.blocks\.[01]\.down_proj\.weight",
    r"adapters\.(mid|us\d+)\.layers\.[012]\.norm\.linear\.weight",
    r"adapters\.(mid|us\d+)\.layers\.[012]\.up_proj\.weight",
    r"adapters\.(mid|us\d+)\.layers\.[012]\.down_proj\.weight",
]


def test_add_noise_is_fp32_even_for_a_bf16_teacher(extractor):
    scheduler = extractor.noise_scheduler
    x0 = torch.randn(3, 4, 8, 8).to(torch.bfloat16)
    noise = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 1, 40])
    naive = scheduler.add_noise(x0, noise.to(torch.bfloat16), t)  # the schedule in bf16
    assert torch.equal(naive[0], x0[0]) and torch.equal(naive[1], x0[1])  # no noise at all
    ours = add_noise(scheduler, x0, noise, t)
    assert ours.dtype == torch.bfloat16
    a = scheduler.alphas_cumprod[t].double()
    exact = a.sqrt()[:, None, None, None] * x0.double() + \
        (1 - a).sqrt()[:, None, None, None] * noise.double()
    error = (ours.double() - exact).abs().max() / exact.abs().max()
    assert error < 1e-2  # only the final cast to bf16 rounds
    assert not torch.equal(ours[0], x0[0])  # t = 0 has its noise


def test_fourier_features_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    fourier = FourierFeatures(256)
    t = torch.tensor([0.1, 0.5, 0.999])
    exact = fourier(t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fourier(t)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, exact)


def test_batch_size_is_global_and_must_divide():
    cfg = TrainConfig(data="d", registry="r", name="n", batch_size=8)
    assert cfg.per_process_batch(1) == 8 and cfg.per_process_batch(2) == 4
    with pytest.raises(UsageError, match="global batch.*3 processes.*e.g. 6"):
        cfg.per_process_batch(3)


def test_official_timestep_range():
    gen = torch.Generator().manual_seed(0)
    full = stratified_timesteps(2000, gen)
    official_t = stratified_timesteps(2000, gen, t_range="official")
    assert full.min() == 0 and full.max() == 999
    assert official_t.min() == 1 and official_t.max() == 998


def student_with_trained_heads(extractor) -> Student:
    torch.manual_seed(3)
    channels = {k: v.channels for k, v in extractor.info.layers.items()}
    student = Student(copy.deepcopy(extractor.unet).float(), channels, 250.5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # heads no longer zero, UNet moved
    return student


@pytest.fixture
def full_checkpoint(extractor, tmp_path):
    student = student_with_trained_heads(extractor)
    state = official.to_official(
        {k: v.contiguous() for k, v in student.unet.state_dict().items()},
        dict(student.heads.state_dict()), float(student.timestep.detach()),
        teacher=extractor.unet.state_dict())
    state.update({f"ae.ae.{k}": v for k, v in extractor.vae.state_dict().items()})
    path = tmp_path / "cleandift_demo_full.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return student, path, state


def test_the_file_has_the_official_names(full_checkpoint):
    _, _, state = full_checkpoint
    heads = [k for k in state if not k.startswith(("unet_feature_extractor_", "ae.ae."))]
    heads.remove("timestep")
    for key in heads:
        assert any(re.fullmatch(p, key) for p in OFFICIAL_HEAD_PATTERNS), key
    assert any(k.startswith("unet_feature_extractor_base.") for k in state)


@pytest.mark.slow  # over 2 s here: outside the unit tier
def test_serving_loads_the_student_and_its_learned_timestep(full_checkpoint, demo_dir, photo):
    student, path, _ = full_checkpoint
    served = load_extractor(str(demo_dir), unet=path, device="cpu")
    assert served.info.student_timestep == pytest.approx(250.5 + 0.0, abs=0.05)
    assert served.info.student_timestep == pytest.approx(float(student.timestep.detach()))
    for key, value in student.unet.state_dict().items():
        torch.testing.assert_close(served.unet.state_dict()[key], value, rtol=0, atol=0)
    pixels = served.preprocess([photo], 128)
    assert torch.isfinite(served.features(pixels, ["us6"])["us6"]).all()


def test_the_trainer_starts_from_it(full_checkpoint, extractor):
    student, path, _ = full_checkpoint
    channels = {k: v.channels for k, v in extractor.info.layers.items()}
    fresh = Student(copy.deepcopy(extractor.unet).float(), channels)
    init_from_full(fresh, path)
    assert float(fresh.timestep.detach()) == pytest.approx(float(student.timestep.detach()))
    for (key, a), b in zip(student.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


@pytest.mark.slow  # over 2 s here: outside the unit tier
def test_publishing_it_keeps_the_student_alone_at_its_learned_timestep(
        full_checkpoint, demo_dir, tmp_path):
    student, path, _ = full_checkpoint
    reg, app = tmp_path / "reg", typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["publish", "--registry", str(reg), "--name", "official",
                                      "--unet", str(path), "--base", str(demo_dir)])
    assert result.exit_code == 0, result.output
    folder = registry.resolve(reg / "official")
    learned = float(student.timestep.detach())
    manifest = registry.read_manifest(folder)
    assert manifest["student_timestep"] == pytest.approx(learned) != 261.0
    assert manifest["source_format"].startswith("official full checkpoint")
    unet_file = folder / registry.UNET_FILE
    flat = load_file(str(unet_file))  # a flat diffusers state dict: no teacher, VAE, heads
    assert set(flat) == set(student.unet.state_dict())
    for key, value in student.unet.state_dict().items():
        torch.testing.assert_close(flat[key], value, rtol=0, atol=0, msg=key)
    assert unet_file.stat().st_size < 0.6 * path.stat().st_size
    served = load_extractor(str(reg / "official"), device="cpu")
    assert served.info.student_timestep == pytest.approx(learned)
    result = CliRunner().invoke(app, ["publish", "--registry", str(reg), "--name", "official",
                                      "--unet", str(path), "--base", str(demo_dir),
                                      "--student-timestep", "261"])
    assert result.exit_code == 2 and "learned timestep" in result.output
    assert registry.list_versions(reg, "official") == ["v1"]


def test_a_flat_unet_file_is_not_mistaken_for_a_full_one(tmp_path, extractor):
    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in extractor.unet.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="not a full CleanDIFT checkpoint"):
        official.read_full(path)


def test_latent_switch_mean_or_a_reproducible_sample(extractor, photo):
    from types import SimpleNamespace

    from cleandift.trainer.train import encode

    pixels = extractor.preprocess([photo], 64).float()
    setup = SimpleNamespace(extractor=extractor, generator=torch.Generator().manual_seed(0))
    mean, _ = encode(setup, pixels, [""])
    again, _ = encode(setup, pixels, [""], "mean")
    sample, _ = encode(setup, pixels, [""], "sample")
    setup.generator.manual_seed(0)
    sample_again, _ = encode(setup, pixels, [""], "sample")
    assert torch.equal(mean, again) and torch.equal(sample, sample_again)
    assert not torch.equal(mean, sample)


def test_resize_switch(photo):
    from cleandift.images import resize_rgb

    bicubic, bilinear = resize_rgb(photo, 64), resize_rgb(photo, 64, "bilinear")
    assert bicubic.shape == bilinear.shape == (64, 64, 3)
    assert (bicubic != bilinear).any()


def test_warmup_is_the_official_schedule_step_for_step():
    from transformers.optimization import get_constant_schedule_with_warmup

    peak, warmup = 1e-5, 2000
    assert warmup_lr(0, peak, warmup) == 0.0  # as the official scheduler: primes Adam only
    for k in (1, 10, 199, 399, 1998):
        assert warmup_lr(k, peak, warmup) == pytest.approx(peak * k / warmup)
    assert warmup_lr(399, peak, warmup) == pytest.approx(1.995e-6)  # the recipe's last step
    assert warmup_lr(2000, peak, warmup) == warmup_lr(5000, peak, warmup) == peak
    assert warmup_lr(0, peak, 0) == peak  # no warm-up
    # The official code's scheduler (transformers' constant_with_warmup on LambdaLR):
    # the rate each step runs at, read before that step.
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    schedule = get_constant_schedule_with_warmup(optimizer, warmup)
    official_lr = []
    for _ in range(402):
        official_lr.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert official_lr[0] == 0.0
    ours = [warmup_lr(k, peak, warmup) for k in range(402)]
    assert ours == pytest.approx(official_lr, abs=1e-15)
