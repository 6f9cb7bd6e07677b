"""`match_points` against an independent brute force of DIFT's procedure, on feature maps
built to be hard: random, smooth (box-filtered), nearly low-rank, float16-rounded; square
and non-square grids; targets smaller and much larger than the model input.

The reference is written apart from cleandift/refine.py and shares nothing with it:
upsample both maps with F.interpolate (bilinear, align_corners=False), normalise over
channels, dot with the source pixel's vector, argmax (the first maximum in row-major order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cleandift.matching import Limits, Refinement, match_points

TIE = 1e-12  # float64 cosines closer than this are the same value


def brute_force(src, tgt, points, src_size, tgt_size, dtype):
    """[(x, y, cosine map)] per point, DIFT's way, in `dtype`."""
    (sw, sh), (tw, th) = src_size, tgt_size
    up_src = F.interpolate(src[None].to(dtype), size=(sh, sw), mode="bilinear",
                           align_corners=False)[0]
    up_tgt = F.interpolate(tgt[None].to(dtype), size=(th, tw), mode="bilinear",
                           align_corners=False)[0]
    unit_tgt = F.normalize(up_tgt.flatten(1), dim=0)  # [C, H*W]
    queries = torch.stack([F.normalize(up_src[:, int(y), int(x)], dim=0) for x, y in points])
    return list(queries @ unit_tgt)


def box_smooth(feat: torch.Tensor, k: int) -> torch.Tensor:
    padded = F.pad(feat[None], (k // 2, k // 2, k // 2, k // 2), mode="replicate")
    return F.avg_pool2d(padded, k, stride=1)[0]


def make(kind: str, channels: int, h: int, w: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(channels, h, w, generator=gen)
    if kind == "smooth":
        return box_smooth(torch.randn(channels, h, w, generator=gen), 7)
    if kind == "low-rank":  # 3 directions plus a whisper of noise
        basis = torch.randn(channels, 3, generator=gen)
        mix = box_smooth(torch.randn(3, h, w, generator=gen), 5)
        noise = 1e-4 * torch.randn(channels, h, w, generator=gen)
        return torch.einsum("cr,rhw->chw", basis, mix) + noise
    if kind == "float16":
        return box_smooth(torch.randn(channels, h, w, generator=gen), 5).half().float()
    raise ValueError(kind)


def pixel_points(size, n, seed):
    gen = torch.Generator().manual_seed(seed)
    w, h = size
    xs = torch.randint(0, w, (n,), generator=gen)
    ys = torch.randint(0, h, (n,), generator=gen)
    return [[float(x), float(y)] for x, y in zip(xs.tolist(), ys.tolist())]


CASES = [  # kind, channels, (h, w) source grid, (h, w) target grid, source size, target size
    ("random", 64, (16, 16), (16, 16), (256, 256), (700, 500)),
    pytest.param("smooth", 64, (16, 16), (12, 20), (256, 256), (1400, 900),
                 marks=pytest.mark.slow),  # a 1.3 Mpx target: about 3 s
    ("smooth", 64, (16, 16), (16, 16), (256, 256), (256, 256)),
    pytest.param("smooth", 1280, (16, 16), (16, 16), (256, 256), (300, 200),
                 marks=pytest.mark.slow),  # SD's 1280 channels: about 3 s
    pytest.param("low-rank", 64, (16, 16), (16, 12), (256, 256), (700, 1000),
                 marks=pytest.mark.slow),  # no bound prunes: about 10 s
    ("float16", 64, (12, 16), (16, 16), (320, 240), (1000, 700)),
    ("smooth", 64, (16, 16), (48, 48), (256, 256), (40, 30)),  # target smaller than its grid
    ("random", 32, (9, 7), (7, 9), (90, 70), (1, 1)),
]


@pytest.mark.parametrize("kind,channels,src_grid,tgt_grid,src_size,tgt_size", CASES)
def test_every_point_gets_difts_pixel(kind, channels, src_grid, tgt_grid, src_size, tgt_size):
    src = make(kind, channels, *src_grid, seed=1)
    tgt = make(kind, channels, *tgt_grid, seed=2)
    points = pixel_points(src_size, 40, seed=3)
    stats = Refinement()
    ours = match_points(src, tgt, points, src_size, tgt_size, stats=stats)
    ref64 = brute_force(src, tgt, points, src_size, tgt_size, torch.float64)
    ref32 = brute_force(src, tgt, points, src_size, tgt_size, torch.float32)
    width = tgt_size[0]
    for match, cos64, cos32 in zip(ours, ref64, ref32):
        assert match.exact
        flat = int(match.target[1]) * width + int(match.target[0])
        best = int(cos64.argmax())
        # The same pixel, or one whose float64 cosine ties the best to rounding.
        assert flat == best or float(cos64[flat]) >= float(cos64[best]) - TIE, (
            match, best % width, best // width, float(cos64[best]) - float(cos64[flat]))
        assert match.score == pytest.approx(float(cos64[best]), abs=1e-9)
        # Against DIFT's own float32 computation: the best value to float32 rounding.
        assert float(cos32[flat]) >= float(cos32.max()) - 2e-6
    assert stats.inexact == 0 and stats.points == len(points)


def test_a_constant_target_ties_everywhere_and_is_answered_exactly():
    """Every pixel ties (to rounding): any pixel is DIFT's answer, with cosine cos(q, 1)."""
    tgt = torch.ones(8, 6, 5)
    src = torch.randn(8, 6, 5, generator=torch.Generator().manual_seed(0)).abs()
    matches = match_points(src, tgt, [[3.0, 4.0], [0.0, 0.0]], (50, 60), (333, 222))
    ref = brute_force(src, tgt, [[3.0, 4.0], [0.0, 0.0]], (50, 60), (333, 222), torch.float64)
    for match, cos in zip(matches, ref):
        assert match.exact and match.score == pytest.approx(float(cos.max()), abs=1e-12)
        assert 0 <= match.target[0] < 333 and 0 <= match.target[1] < 222


def test_a_limit_stops_the_search_and_says_which_matches_are_not_proven():
    src, tgt = make("smooth", 64, 16, 16, seed=4), make("smooth", 64, 16, 16, seed=5)
    points = pixel_points((256, 256), 40, seed=6)
    stats = Refinement()
    cut = match_points(src, tgt, points, (256, 256), (1400, 900), stats=stats,
                       limits=Limits(max_pixels=1))
    assert stats.inexact == sum(not m.exact for m in cut) > 0
    full = match_points(src, tgt, points, (256, 256), (1400, 900))
    assert all(m.exact for m in full)
    # A stopped search still answers its best pixel so far, never a better one than DIFT's.
    assert all(c.score <= f.score + 1e-12 for c, f in zip(cut, full))
    stopped = match_points(src, tgt, points, (256, 256), (1400, 900),
                           limits=Limits(stop=lambda: True))  # nobody waits for the answer
    assert not any(m.exact for m in stopped) and len(stopped) == len(points)


def test_cells_that_nearly_cancel_are_evaluated_in_channel_space():
    """Neighbouring cells v and -3v + eta: the pixel between them has |F| ~ eta, where the
    Gram formula's rounding would dominate (it once answered a cosine of 4e134)."""
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(8, generator=gen, dtype=torch.float64)
        eta = 1e-6 * torch.randn(8, generator=gen, dtype=torch.float64)
        tgt = torch.stack([v, -3 * v + eta], 1)[:, None, :]  # [C, 1, 2]
        src = (0.3 * v / v.norm() + torch.randn(8, generator=gen, dtype=torch.float64))
        match, = match_points(src[:, None, None], tgt, [[0.0, 0.0]], (1, 1), (4, 1))
        cos, = brute_force(src[:, None, None], tgt, [[0.0, 0.0]], (1, 1), (4, 1),
                           torch.float64)
        assert match.exact and match.score == pytest.approx(float(cos.max()), abs=1e-9)
        assert float(cos[int(match.target[0])]) >= float(cos.max()) - TIE


@pytest.mark.slow  # over 2 s here: outside the unit tier
def test_the_candidate_limit_counts_for_the_whole_call_and_every_point_has_an_answer():
    src, tgt = make("smooth", 64, 16, 16, seed=7), make("low-rank", 64, 16, 16, seed=8)
    points = pixel_points((256, 256), 300, seed=9)
    for limit in (0, 1, 100_000):
        stats = Refinement()
        matches = match_points(src, tgt, points, (256, 256), (700, 500), stats=stats,
                               budget=1 << 14, limits=Limits(max_pixels=limit))
        assert all(-1 <= m.score <= 1 for m in matches)  # the best-bound patch, at least
        first_patches = max(1, (700 // 16 + 2)) * 4 * len(points)
        assert stats.pixels <= max(limit, first_patches) + first_patches
        assert stats.inexact == sum(not m.exact for m in matches) > 0


def test_non_finite_features_are_refused():
    from cleandift.matching import NonFiniteFeatures

    good = make("random", 8, 4, 4, seed=1)
    bad = good.clone()
    bad[0, 1, 1] = float("nan")
    for src, tgt in ((good, bad), (bad, good)):
        with pytest.raises(NonFiniteFeatures):
            match_points(src, tgt, [[1.0, 1.0]], (8, 8), (8, 8))
