"""PCK along each of its three axes, pinned by hand-computed tiny examples: each test
changes one axis and keeps the other two fixed."""

import pytest

from cleandift.pck import (
    ALPHAS,
    AVERAGINGS,
    COMPARISONS,
    THRESHOLDS,
    Tally,
    correct,
    format_table,
    pair_distances,
)

BBOX = [0, 0, 100, 50]  # side max(100, 50) = 100
IMAGE = (200, 120)  # side max(200, 120) = 200


def tally(*pairs) -> Tally:
    out = Tally()
    for pred, truth in pairs:
        out.add(pair_distances(pred, truth, BBOX, IMAGE))
    return out


def test_distances_are_euclidean_and_sides_the_longest():
    pair = pair_distances([(3, 4), (0, 0)], [[0, 0], [0, 0]], [10, 20, 40, 100], (90, 160))
    assert pair.distances == [5.0, 0.0]
    assert pair.sides == {"bbox": 80.0, "img": 160.0}  # max(30, 80), max(90, 160)


def test_comparison_axis_decides_a_distance_on_the_threshold():
    pair = pair_distances([(10, 0)], [[0, 0]], BBOX, IMAGE)  # 10 = 0.10 * 100 exactly
    assert correct(pair, "le", "bbox", 0.10) == [True]  # DIFT: <=
    assert correct(pair, "lt", "bbox", 0.10) == [False]  # CleanDIFT's code: <
    assert correct(pair, "lt", "bbox", 0.15) == [True]  # 10 < 15
    assert correct(pair, "le", "bbox", 0.05) == [False]  # 10 > 5
    report = tally(([(10, 0)], [[0, 0]])).report()["pck"]
    assert report["le"]["bbox"]["per_keypoint"]["0.10"] == 100.0
    assert report["lt"]["bbox"]["per_keypoint"]["0.10"] == 0.0


def test_threshold_axis_scales_with_the_bbox_or_the_original_image():
    pair = pair_distances([(15, 0)], [[0, 0]], BBOX, IMAGE)
    assert correct(pair, "le", "bbox", 0.10) == [False]  # 15 > 0.10 * 100
    assert correct(pair, "le", "img", 0.10) == [True]  # 15 <= 0.10 * 200
    assert correct(pair, "le", "img", 0.05) == [False]  # 15 > 0.05 * 200
    portrait = pair_distances([(15, 0)], [[0, 0]], BBOX, (120, 200))
    assert correct(portrait, "le", "img", 0.10) == [True]  # the longest side either way


def test_averaging_axis_per_image_or_pooled_per_keypoint():
    # Pair A: 4 keypoints, 1 correct (25 %); pair B: 1 keypoint, correct (100 %).
    a = ([(0, 0), (50, 0), (50, 0), (50, 0)], [[0, 0]] * 4)
    b = ([(0, 0)], [[0, 0]])
    summary = tally(a, b)
    assert summary.pck("le", "bbox", "per_image", 0.10) == 62.5  # (25 + 100) / 2
    assert summary.pck("le", "bbox", "per_keypoint", 0.10) == 40.0  # 2 / 5
    report = summary.report()
    assert (report["pairs"], report["keypoints"]) == (2, 5)
    assert report["pck"]["le"]["bbox"]["per_image"]["0.10"] == 62.5
    assert report["pck"]["le"]["bbox"]["per_keypoint"]["0.10"] == 40.0
    with pytest.raises(ValueError, match="averaging"):
        summary.pck("le", "bbox", "per_category", 0.10)


def test_the_report_has_every_combination_and_the_table_labels_them():
    report = tally(([(0, 0)], [[0, 0]])).report()
    assert set(report["pck"]) == set(COMPARISONS)
    for comparison in COMPARISONS:
        assert set(report["pck"][comparison]) == set(THRESHOLDS)
        for threshold in THRESHOLDS:
            assert set(report["pck"][comparison][threshold]) == set(AVERAGINGS)
            for averaging in AVERAGINGS:
                by_alpha = report["pck"][comparison][threshold][averaging]
                assert by_alpha == {f"{a:.2f}": 100.0 for a in ALPHAS}
    table = format_table(report)
    for label in ("distance <= alpha * side (DIFT)", "distance < alpha * side (CleanDIFT",
                  "side: target bbox", "side: target image (orig. px)", "per image",
                  "per keypoint"):
        assert label in table
    assert len(table.splitlines()) == 2 + 2 * (1 + len(ALPHAS))


def test_no_pairs_no_pck():
    empty = Tally()
    empty.add(pair_distances([], [], BBOX, IMAGE))  # a pair without keypoints
    report = empty.report()
    assert (report["pairs"], report["keypoints"]) == (0, 0)
    assert report["pck"]["le"]["img"]["per_image"]["0.10"] is None
    assert "-" in format_table(report)
