"""The SPair-71k evaluation on a small fixture in the distributed format."""

import json

import pytest
from typer.testing import CliRunner

from cleandift.cli import app
from cleandift.spair import Tally, evaluate, load_pairs, pck_hits
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


def test_pck_counts_per_keypoint_and_per_image():
    hits = pck_hits([(0, 0), (10, 0)], [[0, 0], [0, 0]], [0, 0, 100, 50], (200, 100))
    assert hits["bbox"][0.05] == [True, False] and hits["bbox"][0.10] == [True, True]
    assert hits["img"][0.05] == [True, True]  # 0.05 * 200 = 10
    tally = Tally()
    tally.add(hits)
    tally.add(pck_hits([(50, 50)], [[0, 0]], [0, 0, 100, 50], (200, 100)))
    report = tally.report()
    assert report["pck_bbox"]["0.10"]["per_keypoint"] == pytest.approx(66.67)
    assert report["pck_bbox"]["0.10"]["per_image"] == pytest.approx(50.0)
    assert report["pairs"] == 2 and report["keypoints"] == 3


def test_load_pairs_filters(spair):
    assert len(load_pairs(spair)) == 3
    assert [p.category for p in load_pairs(spair, category="dog")] == ["dog"]
    assert len(load_pairs(spair, limit=2)) == 2
    with pytest.raises(FileNotFoundError):
        load_pairs(spair, split="trn")


def test_resized_pairs_score_high_in_both_modes(spair, extractor):
    report = evaluate(extractor, load_pairs(spair))
    assert report["overall"]["pairs"] == 3 and report["overall"]["keypoints"] == 12
    assert report["overall"]["pck_bbox"]["0.10"]["per_keypoint"] >= 90
    assert set(report["per_category"]) == {"cat", "dog"}
    dift = evaluate(extractor, load_pairs(spair, limit=1), mode="dift")
    assert dift["prompt"] == report["prompt"] == "a photo of a {category}"
    assert dift["overall"]["pck_img"]["0.15"]["per_image"] >= 75


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


def test_pck_rule_decides_the_boundary():
    exactly = pck_hits([(10, 0)], [[0, 0]], [0, 0, 100, 50], (200, 100))  # 0.10 * 100 = 10
    assert exactly["bbox"][0.10] == [True]
    strict = pck_hits([(10, 0)], [[0, 0]], [0, 0, 100, 50], (200, 100), rule="lt")
    assert strict["bbox"][0.10] == [False] and strict["bbox"][0.15] == [True]


def test_cli_writes_the_report(spair, demo_dir, tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["eval-spair", "--data", str(spair), "--model", str(demo_dir),
                                      "--category", "cat", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["overall"]["pairs"] == 2
    assert report["dtype"] == "float32" and report["pck"] == "<="
    result = CliRunner().invoke(app, ["eval-spair", "--data", str(spair), "--model", str(demo_dir),
                                      "--category", "dog", "--dtype", "bfloat16", "--pck", "lt",
                                      "--prompt", "", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert (report["dtype"], report["pck"], report["prompt"]) == ("bfloat16", "<", "")
