"""The SPair-71k evaluation on a small fixture in the distributed format."""

import json

import pytest
from typer.testing import CliRunner

from cleandift import spair as spair_module
from cleandift.cli import app
from cleandift.matching import Match
from cleandift.spair import ApproximateMatches, evaluate, load_pairs
from tests.corpus import textured_image


@pytest.fixture(scope="module")
def spair(tmp_path_factory):
    """Two categories; each target is the source resized by 1.5, keypoints scaled too."""
    root = tmp_path_factory.mktemp("spair")
    for category, seeds in (("cat", (1, 2)), ("dog", (3,))):
        folder = root / "JPEGImages" / category
        folder.mkdir(parents=True)
        for seed in seeds:
            source = textured_image(200, 160, seed)
            source.save(folder / f"{seed}_a.jpg", quality=95)
            source.resize((300, 240)).save(folder / f"{seed}_b.jpg", quality=95)
            kps = [[60, 50], [100, 80], [140, 110], [90, 120]]
            ann = {"category": category, "src_imname": f"{seed}_a.jpg",
                   "trg_imname": f"{seed}_b.jpg", "src_kps": kps,
                   "trg_kps": [[(x + 0.5) * 1.5 - 0.5, (y + 0.5) * 1.5 - 0.5] for x, y in kps],
                   "trg_bndbox": [30, 30, 270, 210], "src_bndbox": [20, 20, 180, 140]}
            out = root / "PairAnnotation" / "test"
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{seed:06d}-{category}.json").write_text(json.dumps(ann))
    return root


def test_load_pairs_filters(spair):
    assert len(load_pairs(spair)) == 3
    assert [p.category for p in load_pairs(spair, category="dog")] == ["dog"]
    assert len(load_pairs(spair, limit=2)) == 2
    with pytest.raises(FileNotFoundError):
        load_pairs(spair, split="trn")


def test_resized_pairs_score_high_in_both_modes(spair, extractor):
    report = evaluate(extractor, load_pairs(spair))
    assert report["overall"]["pairs"] == 3 and report["overall"]["keypoints"] == 12
    assert report["overall"]["pck"]["le"]["bbox"]["per_keypoint"]["0.10"] >= 90
    assert set(report["per_category"]) == {"cat", "dog"}
    dift = evaluate(extractor, load_pairs(spair, limit=1), mode="dift")
    assert dift["prompt"] == report["prompt"] == "a photo of a {category}"
    assert dift["overall"]["pck"]["le"]["img"]["per_image"]["0.15"] >= 75
    assert report["matches"] == {"total": 12, "inexact": 0} and not report["approximate"]


def spy(extractor, monkeypatch) -> list[tuple[str, str, list | None]]:
    """Records (mode, prompt, seeds) of every real forward pass."""
    calls = []
    real = extractor.features

    def features(pixels, keys, prompt="", *, mode="clean", seeds=None, **kw):
        calls.append((mode, prompt, seeds))
        return real(pixels, keys, prompt, mode=mode, seeds=seeds, **kw)

    monkeypatch.setattr(extractor, "features", features)
    return calls


def test_both_modes_get_the_same_prompt_policy(spair, extractor, monkeypatch):
    calls = spy(extractor, monkeypatch)
    evaluate(extractor, load_pairs(spair, category="cat", limit=1), mode="clean")
    evaluate(extractor, load_pairs(spair, category="cat", limit=1), mode="dift")
    assert [prompt for _, prompt, _ in calls] == ["a photo of a cat"] * 4
    calls.clear()
    report = evaluate(extractor, load_pairs(spair, category="cat", limit=1), prompt="")
    assert [prompt for _, prompt, _ in calls] == ["", ""] and report["prompt"] == ""


@pytest.mark.slow  # over 2 s here: outside the unit tier
def test_dift_noise_is_fresh_per_image_and_reproducible(spair, extractor, monkeypatch):
    calls = spy(extractor, monkeypatch)
    pairs = load_pairs(spair)
    first = evaluate(extractor, pairs, mode="dift")
    seeds = [s[0] for _, _, s in calls]
    assert len(seeds) == 6 and len(set(seeds)) == 6  # every image its own noise
    calls.clear()
    again = evaluate(extractor, pairs, mode="dift")
    assert [s[0] for _, _, s in calls] == seeds and again["overall"] == first["overall"]
    calls.clear()
    evaluate(extractor, pairs, mode="dift", seed=1)
    assert set(s[0] for _, _, s in calls).isdisjoint(seeds)  # the base seed moves them all


def shifted_matches(shift: float, exact: bool = True):
    """A stand-in for match_points: each fixture keypoint's true target, `shift` px to the
    right (the fixture's targets are the sources scaled by 1.5)."""
    def match_points(src, tgt, points, src_size, tgt_size, **_kw):
        assert tgt_size == (300, 240)  # the target's original size, not the model's 256
        return [Match((x, y), ((x + 0.5) * 1.5 - 0.5 + shift, (y + 0.5) * 1.5 - 0.5), 1.0,
                      exact) for x, y in points]
    return match_points


def test_thresholds_use_the_target_bbox_and_original_image(spair, extractor, monkeypatch):
    # Target image 300 x 240 (model input 256), target bbox side max(240, 180) = 240.
    monkeypatch.setattr(spair_module, "match_points", shifted_matches(30.0))
    pck = evaluate(extractor, load_pairs(spair, category="cat"))["overall"]["pck"]
    assert pck["le"]["img"]["per_keypoint"]["0.10"] == 100.0  # 30 <= 0.10 * 300
    assert pck["lt"]["img"]["per_keypoint"]["0.10"] == 0.0  # not 30 < 30
    assert pck["le"]["bbox"]["per_image"]["0.10"] == 0.0  # 30 > 0.10 * 240
    assert pck["lt"]["bbox"]["per_image"]["0.15"] == 100.0  # 30 < 0.15 * 240 = 36
    assert pck["le"]["img"]["per_image"]["0.05"] == 0.0  # 30 > 0.05 * 300


def test_approximate_matches_are_refused_unless_allowed(spair, extractor, monkeypatch):
    monkeypatch.setattr(spair_module, "match_points", shifted_matches(0.0, exact=False))
    pairs = load_pairs(spair, category="cat")
    with pytest.raises(ApproximateMatches, match="8 of 8 matches are approximate") as info:
        evaluate(extractor, pairs)
    assert (info.value.inexact, info.value.total) == (8, 8)
    report = evaluate(extractor, pairs, allow_approximate=True)
    assert report["approximate"] and report["matches"] == {"total": 8, "inexact": 8}
    assert report["overall"]["pck"]["lt"]["bbox"]["per_image"]["0.05"] == 100.0


def run_cli(spair, demo_dir, *args):
    return CliRunner().invoke(app, ["eval-spair", "--data", str(spair), "--model", str(demo_dir),
                                    *args])


@pytest.mark.slow  # over 2 s here: outside the unit tier
def test_cli_writes_the_report_and_prints_the_table(spair, demo_dir, tmp_path):
    out = tmp_path / "r.json"
    result = run_cli(spair, demo_dir, "--category", "cat", "--json", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["overall"]["pairs"] == 2 and report["dtype"] == "float32"
    assert report["protocol"]["comparison"]["le"].startswith("correct if distance <=")
    assert "side: target image (orig. px)" in result.stdout
    assert "distance <= alpha * side (DIFT)" in result.stdout
    assert "all 8 matches exact" in result.stdout
    result = run_cli(spair, demo_dir, "--category", "dog", "--dtype", "bfloat16",
                     "--prompt", "", "--json", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert (report["dtype"], report["prompt"]) == ("bfloat16", "")


@pytest.mark.slow  # over 2 s here: outside the unit tier
def test_cli_refuses_approximate_pck_unless_allowed(spair, demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(spair_module, "match_points", shifted_matches(0.0, exact=False))
    out = tmp_path / "r.json"
    result = run_cli(spair, demo_dir, "--category", "dog", "--json", str(out))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "error: 4 of 4 matches are approximate" in result.stderr
    assert "Traceback" not in result.output and not out.exists()
    result = run_cli(spair, demo_dir, "--category", "dog", "--allow-approximate",
                     "--json", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["approximate"] is True
    assert "APPROXIMATE: 4 of 4 matches" in result.stdout
