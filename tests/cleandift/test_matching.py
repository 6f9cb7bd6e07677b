import math
import time

import pytest
import torch
import torch.nn.functional as F

from cleandift.contract import InvalidPointsError, validate_points
from cleandift.matching import DeadlinePassed, match_points, mutual_matches
from cleandift.refine import Refinement, Target, argmax_upsampled


def reference_match(src, tgt, points, src_size, tgt_size):
    """DIFT's procedure: both maps upsampled to the image sizes, cosine, argmax."""
    (sw, sh), (tw, th) = src_size, tgt_size
    su = F.interpolate(src[None].float(), size=(sh, sw), mode="bilinear", align_corners=False)[0]
    tu = F.normalize(
        F.interpolate(tgt[None].float(), size=(th, tw), mode="bilinear", align_corners=False)[0],
        dim=0,
    )
    out = []
    for x, y in points:
        sim = torch.einsum("c,chw->hw", F.normalize(su[:, int(y), int(x)], dim=0), tu)
        flat = int(sim.flatten().argmax())
        out.append((flat % tw, flat // tw))
    return out


def grid_points(size, n=12):
    w, h = size
    return [[float(int(x)), float(int(y))] for x in torch.linspace(0, w - 1, n)
            for y in torch.linspace(0, h - 1, n)]


def test_identity_pair_maps_every_point_to_itself(extractor, photo):
    feats = extractor.extract([photo], layers=["us6"])[0]["us6"]
    points = grid_points(photo.size)
    matches = match_points(feats, feats, points, photo.size, photo.size)
    # Within half a feature cell of the border the upsampled map is constant (clamped),
    # so those pixels tie; the reference takes the first, as we do.
    half_cell = (photo.width / feats.shape[-1] / 2, photo.height / feats.shape[-2] / 2)
    exact = 0
    for match in matches:
        assert match.score == pytest.approx(1.0, abs=1e-4)
        assert abs(match.target[0] - match.source[0]) <= half_cell[0]
        assert abs(match.target[1] - match.source[1]) <= half_cell[1]
        exact += match.target == match.source
    assert exact >= 0.75 * len(matches)


def test_resized_copy_maps_by_the_scale(extractor, photo):
    bigger = photo.resize((photo.width * 2, photo.height * 2))
    feats = extractor.extract([photo, bigger], layers=["us6"])
    src, tgt = feats[0]["us6"], feats[1]["us6"]
    # Interior points: within half a cell of the border the upsampled maps are flat (ties).
    cell = photo.width / src.shape[-1]
    points = [[x, y] for x, y in grid_points(photo.size, n=10)
              if cell <= x <= photo.width - cell and cell <= y <= photo.height - cell]
    errors = []
    for match in match_points(src, tgt, points, photo.size, bigger.size):
        x, y = match.source
        ex, ey = (x + 0.5) * 2 - 0.5, (y + 0.5) * 2 - 0.5
        errors.append(math.hypot(match.target[0] - ex, match.target[1] - ey))
    errors.sort()
    assert errors[len(errors) * 9 // 10] <= 2.0  # 90% within 2 px at twice the scale


def test_agrees_with_the_reference_procedure(extractor, photo, photo2):
    feats = extractor.extract([photo, photo2], layers=["us6"])
    src, tgt = feats[0]["us6"], feats[1]["us6"]
    points = grid_points(photo.size, n=10)
    ours = match_points(src, tgt, points, photo.size, photo2.size, budget=4096)
    ref = reference_match(src, tgt, points, photo.size, photo2.size)
    close = sum(
        abs(m.target[0] - r[0]) <= 1 and abs(m.target[1] - r[1]) <= 1 for m, r in zip(ours, ref)
    )
    assert close >= 0.95 * len(points)


@pytest.mark.parametrize("shape,size", [
    ((16, 5, 7), (50, 31)), ((8, 1, 1), (3, 4)), ((8, 6, 6), (6, 6)), ((32, 12, 12), (200, 150)),
    ((16, 8, 8), (3, 2)), ((64, 16, 16), (333, 777)), ((16, 3, 9), (1000, 20)),
])
def test_refinement_finds_the_exact_argmax(shape, size):
    """Against DIFT's procedure in float64: the pixel we return has the maximal upsampled
    cosine (up to float64 rounding: exact ties in the flat border bands may go either way)."""
    torch.manual_seed(0)
    feat = torch.randn(shape)
    queries = F.normalize(torch.randn(40, shape[0]), dim=1)
    width, height = size
    up = F.normalize(F.interpolate(feat[None].double(), size=(height, width), mode="bilinear",
                                   align_corners=False)[0], dim=0)
    sim = torch.einsum("pc,chw->phw", queries.double(), up).flatten(1)
    stats = Refinement()
    value, flat, exact = argmax_upsampled(Target(feat, size), queries, stats, budget=1 << 22)
    assert (sim.max(1).values - sim.gather(1, flat[:, None])[:, 0]).abs().max() < 1e-12
    torch.testing.assert_close(value.double(), sim.max(1).values, atol=1e-9, rtol=0)
    assert bool(exact.all()) and stats.inexact == 0 and stats.points == 40


def test_matching_cost_stays_far_below_difts_on_a_huge_target(extractor, photo, photo2):
    """On the demo model's features, exact matching against a 7000 x 7000 target evaluates a
    small fraction of its pixels per point, and never more than the worst case."""
    feats = extractor.extract([photo, photo2], layers=["us6"])
    src, tgt = feats[0]["us6"], feats[1]["us6"]
    points = grid_points(photo.size, n=8)
    stats = Refinement()
    matches = match_points(src, tgt, points, photo.size, (7000, 7000), stats=stats)
    assert len(matches) == len(points) and stats.inexact == 0
    assert all(m.exact for m in matches)
    worst = Target(tgt, (7000, 7000)).worst_case
    assert stats.pixels <= worst * len(points)
    assert stats.pixels / len(points) < 1e-2 * 7000 * 7000  # DIFT's way: every pixel


def test_a_passed_deadline_stops_matching(extractor, photo):
    feats = extractor.extract([photo], layers=["us6"])[0]["us6"]
    with pytest.raises(DeadlinePassed):
        match_points(feats, feats, [[1.0, 2.0]], photo.size, photo.size, deadline=time.time() - 1)
    with pytest.raises(DeadlinePassed):
        mutual_matches(feats, feats, photo.size, photo.size, max_matches=5,
                       deadline=time.time() - 1)


def test_large_target_stays_within_the_memory_budget():
    """A 4000x3000 target with 1280 channels: C x H x W would be 61 GB in fp32."""
    torch.manual_seed(0)
    feat = torch.randn(1280, 48, 48)
    matches = match_points(feat, feat, [[200.0, 300.0], [2500.0, 1700.0]], (4000, 3000),
                           (4000, 3000), budget=1 << 22)
    assert [m.target for m in matches] == [(200.0, 300.0), (2500.0, 1700.0)]


def test_mutual_matches_are_symmetric_and_ranked(extractor, photo, photo2):
    feats = extractor.extract([photo, photo2], layers=["us6"])
    a, b = feats[0]["us6"], feats[1]["us6"]
    ab = mutual_matches(a, b, photo.size, photo2.size, max_matches=1000)
    ba = mutual_matches(b, a, photo2.size, photo.size, max_matches=1000)
    assert ab, "random-weight features still have mutual neighbours"
    assert {(m.source, m.target) for m in ab} == {(m.target, m.source) for m in ba}
    scores = [m.score for m in ab]
    assert scores == sorted(scores, reverse=True)
    assert len(mutual_matches(a, b, photo.size, photo2.size, max_matches=3)) == 3


@pytest.mark.parametrize(
    "points",
    [[[1, float("nan")]], [[-5, 3]], [[3, 500]], [[1, 2, 3]], "[[1,2]]", [[True, 1]], [[1, 2]] * 5],
)
def test_invalid_points(points):
    with pytest.raises(InvalidPointsError):
        validate_points(points, (100, 100), max_points=4)


def test_valid_points_edges():
    assert validate_points([[-0.5, 99.5], [0, 0]], (100, 100), 4) == [[-0.5, 99.5], [0.0, 0.0]]
