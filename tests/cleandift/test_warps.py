"""The warp score's ground truth, checked against the pixels: warp an image holding one
bright dot with PIL and find the dot again; the warp's own mapping must say where."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from PIL import Image
from tqdm import tqdm
from typer.testing import CliRunner

from cleandift import warps
from cleandift.warps_cli import register
from tests.corpus import encode, textured_image

SIZE = (160, 120)


SIGMA = 1.5


def dot_image(x: float, y: float, size: tuple[int, int] = SIZE) -> Image.Image:
    """A float image, zero but for a Gaussian dot centred at pixel (x, y)."""
    ys, xs = np.mgrid[0:size[1], 0:size[0]]
    dot = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * SIGMA**2))
    return Image.fromarray(dot.astype(np.float32), mode="F")


def find_dot(image: Image.Image, window: int) -> np.ndarray:
    """The dot's centre: the intensity centroid within `window` pixels of the brightest."""
    values = np.asarray(image, dtype=np.float64).clip(min=0)
    peak_y, peak_x = np.unravel_index(values.argmax(), values.shape)
    ys, xs = np.mgrid[0:values.shape[0], 0:values.shape[1]]
    weights = values * ((abs(xs - peak_x) <= window) & (abs(ys - peak_y) <= window))
    return np.array([(xs * weights).sum(), (ys * weights).sum()]) / weights.sum()


def dots_for(warp: warps.Warp, window: int, count: int = 12) -> np.ndarray:
    """Source dots whose image lies `window` + 1 pixels inside the target (drawn on the
    target and sent back, so strong zooms get their share)."""
    w, h = warp.size
    wanted = np.random.default_rng(0).uniform([window + 1] * 2, [w - 2 - window, h - 2 - window],
                                              (count, 2))
    back = np.c_[wanted, np.ones(count)] @ np.linalg.inv(warp.matrix).T
    sources = back[:, :2] / back[:, 2:]
    ok = ((sources >= 6) & (sources <= np.array(SIZE) - 7)).all(axis=1)
    return sources[ok]


def strong_warps() -> list[warps.Warp]:
    """Large zooms, where a half-pixel convention error would move the dot by a pixel."""
    centre = np.array([SIZE[0] / 2 - 0.5, SIZE[1] / 2 - 0.5])
    zoomed = centre + 3 * (warps.image_corners(SIZE) - centre)
    return [warps.homography_warp(SIZE, zoomed),
            warps.crop_warp((50.0, 40.0, 90.0, 70.0), (160, 120)),  # 4x up
            warps.crop_warp((10.3, 5.7, 150.2, 110.9), (47, 35)),  # 3x down
            warps.flip_warp(SIZE)]


def random_warps() -> list[warps.Warp]:
    return [w for seed in range(4) for w in warps.random_warps(SIZE, np.random.default_rng(seed))]


@pytest.mark.parametrize("warp", strong_warps() + random_warps(),
                         ids=lambda w: f"{w.kind}-{w.size[0]}x{w.size[1]}")
def test_each_warp_sends_a_dot_where_its_mapping_says(warp):
    zoom = abs(np.linalg.det(warp.matrix[:2, :2])) ** 0.5  # the dot's size on the target
    window = max(5, int(np.ceil(4 * SIGMA * zoom)))
    dots = dots_for(warp, window)
    assert len(dots) >= 3
    for x, y in dots:
        out = warp.apply(dot_image(x, y))
        assert out.size == warp.size
        expected = warp.map_points(np.array([[x, y]]))[0]
        found = find_dot(out, window)
        assert np.abs(found - expected).max() < 0.2, (warp.kind, (x, y), found, expected)


def test_flip_is_the_mirror_and_points_outside_are_skipped():
    image = textured_image(*SIZE, seed=3)
    flip = warps.flip_warp(SIZE)
    assert np.array_equal(np.asarray(flip.apply(image)), np.asarray(image)[:, ::-1])
    assert flip.map_points(np.array([[0.0, 5.0]])).tolist() == [[SIZE[0] - 1.0, 5.0]]
    crop = warps.crop_warp((40.0, 30.0, 80.0, 60.0), (40, 30))
    mapped = crop.map_points(np.array([[60.0, 45.0], [5.0, 5.0]]))
    assert warps.inside(mapped, crop.size).tolist() == [True, False]


def test_the_score_is_deterministic_and_counts_every_point(extractor, tmp_path):
    """The demo model's features are random, but the report's structure, determinism and
    point counts do not depend on that."""
    (tmp_path / "a.png").write_bytes(encode(textured_image(96, 80, seed=1), "PNG"))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    samples, skipped = warps.load_samples(str(tmp_path))
    assert len(samples) == 1 and skipped == 1
    features = warps.extractor_features(extractor, size=128)
    first = warps.evaluate(features, samples, ["us3"], layer="us6", progress=False)
    assert first == warps.evaluate(features, samples, ["us3"], layer="us6", progress=False)
    assert set(first["layers"]) == {"us3", "us6"} and first["layer"] == "us6"
    us6 = first["layers"]["us6"]
    assert us6["points"] + sum(first["skipped_points"].values()) == 3 * warps.GRID**2
    assert 0 <= us6["pck@0.05"] <= us6["pck@0.10"] <= 1
    assert warps.gate_score(first) == us6["pck@0.10"]
    assert first["fingerprint"] == warps.fingerprint(samples, seed=0, grid=warps.GRID)
    assert first["fingerprint"] != warps.fingerprint(samples, seed=1, grid=warps.GRID)
    assert first["inexact_matches"] == 0


@pytest.mark.slow  # over 2 s here: outside the unit tier
def test_eval_warps_command_reports_per_layer(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tqdm, "monitor_interval", 0)  # no monitor thread outliving the test
    (tmp_path / "a.png").write_bytes(encode(textured_image(96, 80, seed=1), "PNG"))
    app = typer.Typer()
    register(app)
    app.command("unused")(lambda: None)  # (a lone command would be the app itself)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval-warps", str(tmp_path), "--model", str(demo_dir),
                                      "--layers", "us3", "--size", "128", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report == json.loads(result.stdout)
    assert set(report["layers"]) == {"us3", "us6"} and report["size"] == 128
    assert report["model_version"] == "demo-seed0" and "us6: PCK@0.05" in result.stderr
    missing = CliRunner().invoke(app, ["eval-warps", str(tmp_path / "none"), "--model",
                                       str(demo_dir)])
    assert missing.exit_code == 2 and "error:" in missing.stderr
