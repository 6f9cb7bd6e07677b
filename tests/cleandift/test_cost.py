"""The per-job cost model (cleandift/cost.py), one factor at a time: each multiplies the
cost the way it multiplies a worker's time, and a refusal names what would help."""

from __future__ import annotations

import pytest

from cleandift.cost import (
    ENCODE_SHARE,
    PAIR_COST,
    POINT_COST,
    TooCostly,
    check_cost,
    request_cost,
    unet_depth,
)
from cleandift.method import LAYER_KEYS

BASE = {"kind": "features", "mode": "clean", "size": 512, "layers": ["us6"], "images": 1,
        "points": 0}


def cost(**change):
    return request_cost(**{**BASE, **change})


def test_images_multiply_the_forward():
    assert cost(images=3).forward == pytest.approx(3 * cost().forward)


def test_difts_ensemble_multiplies_the_unet_not_the_encoder():
    clean, dift = cost().forward, cost(mode="dift").forward
    depth = unet_depth(["us6"])
    assert dift / clean == pytest.approx((ENCODE_SHARE + 8 * depth) / (ENCODE_SHARE + depth))


def test_size_costs_more_than_its_square():
    """Self-attention grows with the square of the pixel count."""
    small, large = cost(size=256).forward, cost(size=1024).forward
    assert large > 16 * small
    megapixels = 1024 * 1024 / 1e6
    assert large / small == pytest.approx(16 * (1 + megapixels) / (1 + 256 * 256 / 1e6))


def test_the_deepest_layer_sets_the_share_of_the_unet():
    depths = [unet_depth([key]) for key in LAYER_KEYS]
    assert depths == sorted(depths) and depths[-1] == 1.0 and depths[0] > 0.5
    assert unet_depth(["mid", LAYER_KEYS[-1]]) == 1.0  # the deepest one counts
    assert unet_depth([]) == 1.0  # the model's defaults: assume the whole UNet


def test_points_are_matched_in_every_target():
    one = request_cost(**{**BASE, "kind": "correspond", "images": 2, "points": 100})
    four = request_cost(**{**BASE, "kind": "correspond", "images": 5, "points": 100})
    assert one.matching == pytest.approx(100 * POINT_COST)
    assert four.matching == pytest.approx(4 * 100 * POINT_COST)


def test_without_points_every_cell_pair_is_compared():
    shape = {**BASE, "kind": "correspond", "images": 2, "stride": 16}
    cells = (512 // 16) ** 2
    assert request_cost(**shape).matching == pytest.approx(cells * cells * PAIR_COST)
    features = request_cost(**{**BASE, "stride": 16})
    assert features.matching == 0  # /features matches nothing


def test_the_ceiling_is_inclusive_and_a_refusal_says_what_helps():
    dift = request_cost(**{**BASE, "kind": "correspond", "mode": "dift", "images": 5,
                           "points": 1000})
    check_cost(dift, dift.total)  # exactly at the ceiling: allowed
    with pytest.raises(TooCostly) as refused:
        check_cost(dift, dift.total / 2)
    message = str(refused.value)
    for hint in ("a smaller size", "mode=clean", "fewer targets", "fewer points"):
        assert hint in message, message
    assert f"{dift.total:.1f} megapixel-passes" in message
    with pytest.raises(TooCostly) as plain:
        check_cost(cost(size=1024), 0.1)
    assert "mode=clean" not in str(plain.value) and "fewer targets" not in str(plain.value)
