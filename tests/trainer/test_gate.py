"""The publishing gate: a version whose warp score (scored here with the demo model, and
with the same model's features scrambled: a broken model) is below the live one's by more
than the margin is refused by `publish --promote` unless forced, and by the trainer."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
import torch
import typer
from typer.testing import CliRunner

from cleandift import registry, warps
from cleandift.trainer.cli import register
from cleandift.trainer.config import TrainConfig
from cleandift.trainer.publish import publish_weights
from cleandift.trainer.quality import conditions, live_scorer
from cleandift.trainer.train import gate
from tests.corpus import encode, textured_image


def scrambled(features: warps.FeatureFn) -> warps.FeatureFn:
    """The same features at shuffled positions, differently per image: no correspondence."""

    def run(images, keys):
        g = torch.Generator().manual_seed(0)
        return {k: torch.stack([m.flatten(1)[:, torch.randperm(m[0].numel(), generator=g)]
                                .reshape(m.shape) for m in v])
                for k, v in features(images, keys).items()}

    return run


@pytest.fixture(scope="module")
def reports(extractor):
    samples = []
    for i in range(2):
        data = encode(textured_image(128, 96, seed=i), "PNG")
        samples.append(warps.Sample(str(i), hashlib.sha256(data).hexdigest(),
                                    textured_image(128, 96, seed=i)))
    demo = warps.extractor_features(extractor, size=128)
    how = conditions(128, torch.float32)  # as the trainer scores a fp32 run at 128 px
    good = warps.evaluate(demo, samples, [], layer="us6", progress=False, conditions=how)
    broken = warps.evaluate(scrambled(demo), samples, [], layer="us6", progress=False,
                            conditions=how)
    assert warps.gate_score(broken) < warps.gate_score(good) - 0.1
    return good, broken, samples


@pytest.fixture
def reg(tmp_path, reports):
    """v1 (the demo model's score) live; v2 (scrambled) and v3 (no score) published."""
    unet = tmp_path / "unet.bin"
    unet.write_bytes(b"weights")
    good, broken, _ = reports
    for manifest, live in (({"warps": good}, True), ({"warps": broken}, False), ({}, False)):
        registry.publish(tmp_path / "reg", "m", {registry.UNET_FILE: unet}, manifest,
                         make_latest=live)
    return tmp_path / "reg"


def promote(reg, version, *extra):
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["publish", "--registry", str(reg), "--name", "m",
                                      "--promote", version, *extra])
    assert "Traceback" not in result.output
    return result


def test_promote_is_refused_below_the_margin_unless_forced(reg):
    refused = promote(reg, "v2")
    assert refused.exit_code == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refused: v2's warp PCK@0.10 on us6")
    assert "--force" in lines[0] and "0.02" in lines[0]
    assert registry.latest_version(reg / "m") == "v1"

    forced = promote(reg, "v2", "--force")
    assert forced.exit_code == 0, forced.output
    assert "warning: forced" in forced.stderr
    assert registry.latest_version(reg / "m") == "v2"

    back = promote(reg, "v1")  # better than the live v2: no question
    assert back.exit_code == 0 and "warning" not in back.stderr
    assert promote(reg, "v2", "--margin", "1").exit_code == 0


def test_a_version_without_a_score_passes_with_a_warning(reg):
    result = promote(reg, "v3")
    assert result.exit_code == 0
    assert "warning: v3 has no warp score" in result.stderr
    assert registry.latest_version(reg / "m") == "v3"


def test_the_trainer_publishes_a_refused_version_without_making_it_live(reg, reports):
    cfg = TrainConfig(data="unused", registry=reg, name="m")
    verdict = gate(cfg, {"warps": reports[1]})
    assert not verdict["allowed"] and not verdict["forced"] and "below" in verdict["message"]
    cfg.force = True
    assert gate(cfg, {"warps": reports[1]})["forced"] is True
    better = gate(cfg, {"warps": reports[0]})
    assert better["allowed"] and not better["forced"] and "within the margin" in better["message"]


@pytest.mark.slow  # over 2 s here: outside the unit tier
def test_the_trainer_rescores_a_live_version_measured_on_other_images(
        tmp_path, reports, extractor, demo_dir, cache_dir):
    """Another run held out other images: its report does not compare, so the trainer
    scores the live weights on the candidate's images (the same size and precision)."""
    good, broken, samples = reports
    elsewhere = {**good, "fingerprint": "other-images", "layers": {"us6": {"pck@0.10": 0.0}}}
    publish_weights(tmp_path / "reg", "m", extractor.unet.state_dict(),
                    {"base": str(demo_dir), "input_size": 128, "warps": elsewhere})
    cfg = TrainConfig(data="unused", registry=tmp_path / "reg", name="m")
    scorer = live_scorer(tmp_path / "reg" / "m", samples, 128, device=torch.device("cpu"),
                         dtype=torch.float32, autocast=contextlib.nullcontext,
                         cache_dir=cache_dir)
    refused = gate(cfg, {"warps": broken}, scorer)
    assert not refused["allowed"], refused
    # the live demo weights, re-scored, score exactly what the demo model scored here
    assert f"the live v1's {warps.gate_score(good):.4f} (re-scored" in refused["message"]
    assert gate(cfg, {"warps": good}, scorer)["allowed"]
    without = gate(cfg, {"warps": broken})  # no images to re-score on: not compared
    assert without["allowed"] and "different images" in without["message"]
    # A candidate scored at another size: the live one re-scored here (128 px) still does
    # not compare with it, and the gate says so rather than comparing.
    at_another_size = {**broken, "fingerprint": warps.fingerprint(
        samples, seed=0, grid=warps.GRID, conditions=conditions(256, torch.float32))}
    other = gate(cfg, {"warps": at_another_size}, scorer)
    assert other["allowed"] and "still measured otherwise" in other["message"], other
    # A live version that cannot be loaded any more (its weights torn): not compared.
    (tmp_path / "reg" / "m" / "v1" / registry.UNET_FILE).write_bytes(b"torn")
    torn = gate(cfg, {"warps": broken}, scorer)
    assert torn["allowed"] and "could not be scored" in torn["message"], torn
