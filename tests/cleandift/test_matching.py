import math

import pytest
import torch
import torch.nn.functional as F

from cleandift.contract import InvalidPointsError, validate_points
from cleandift.matching import match_points, mutual_matches, upsampled_inv_norm


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


def test_inverse_norm_map_is_exact():
    torch.manual_seed(0)
    for shape, size in [((16, 5, 7), (50, 31)), ((8, 1, 1), (3, 4)), ((8, 6, 6), (6, 6))]:
        feat = torch.randn(shape)
        up = F.interpolate(feat[None], size=size[::-1], mode="bilinear", align_corners=False)[0]
        got = upsampled_inv_norm(feat, size, budget=64)
        torch.testing.assert_close(got * up.norm(dim=0), torch.ones(size[::-1]))


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
