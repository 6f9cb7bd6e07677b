"""Semantic correspondence by cosine similarity of feature maps (the DIFT protocol).

DIFT upsamples both maps to the original image sizes and takes the argmax of the cosine.
We return exactly that argmax without holding anything at full resolution (refine.py): a
branch and bound over the feature grid's patches whose typical cost depends on the points
and the grid, and whose worst case grows with the target's rows, not its pixel count.
Every function works on the features' device (the GPU in a worker) and checks an
optional deadline between chunks, so a long request can be abandoned cleanly; `Limits`
stops a search early with the matches it could not prove marked `exact=False`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .refine import Limits, Refinement, Target, argmax_upsampled

DEFAULT_BUDGET = 1 << 24  # elements held at once in any intermediate


class DeadlinePassed(Exception):
    """The caller's deadline passed between two chunks of matching work."""


class NonFiniteFeatures(ValueError):
    """A feature map holds inf or NaN (an fp16 overflow, say): matching is undefined."""


@dataclass(frozen=True)
class Match:
    source: tuple[float, float]
    target: tuple[float, float]
    score: float
    exact: bool = True

    def to_json(self) -> dict[str, object]:
        return {"source": list(self.source), "target": list(self.target), "score": self.score,
                "exact": self.exact}


def _check(deadline: float | None) -> None:
    if deadline is not None and time.time() > deadline:
        raise DeadlinePassed


def sample_points(feat: torch.Tensor, points: torch.Tensor, size: tuple[int, int],
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bilinear features [P, C] at pixel points [P, 2] of an image of size (W, H).

    Identical to reading the map upsampled to (H, W) at those pixels (half-pixel centres,
    border clamping), as F.interpolate(align_corners=False) does; matching asks for
    float64, so that its query is that value to rounding.
    """
    width, height = size
    pts = points.to(torch.float64)
    grid = torch.empty_like(pts)
    grid[:, 0] = (pts[:, 0] + 0.5) / width * 2 - 1
    grid[:, 1] = (pts[:, 1] + 0.5) / height * 2 - 1
    out = F.grid_sample(
        feat[None].to(dtype),
        grid.to(device=feat.device, dtype=dtype)[None, None],
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return out[0, :, 0].T  # [P, C]


def match_points(
    source: torch.Tensor,
    target: torch.Tensor,
    points: list[list[float]] | torch.Tensor,
    source_size: tuple[int, int],
    target_size: tuple[int, int],
    *,
    budget: int = DEFAULT_BUDGET,
    deadline: float | None = None,
    limits: Limits = Limits(),
    stats: Refinement | None = None,
) -> list[Match]:
    """For each source point (x, y), the target pixel of highest cosine similarity: DIFT's
    argmax, `exact` unless `limits` stopped its search first (then the best pixel of the
    patches it evaluated). Past `deadline` it raises DeadlinePassed (nobody is waiting)."""
    pts = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
    if len(pts) == 0:
        return []
    stats = stats if stats is not None else Refinement()
    if not (bool(torch.isfinite(source).all()) and bool(torch.isfinite(target).all())):
        raise NonFiniteFeatures("the feature maps hold inf or NaN: no cosine is defined")
    query = F.normalize(sample_points(source, pts, source_size, torch.float64), dim=1)
    prepared = Target(target, target_size)
    origin = stats.pixels  # the candidate limit counts for the whole call
    width = target_size[0]
    per_chunk = max(1, budget // (8 * prepared.h * prepared.w))  # corner dots and bounds
    matches: list[Match] = []
    for start in range(0, len(pts), per_chunk):
        _check(deadline)
        score, flat, exact = argmax_upsampled(prepared, query[start:start + per_chunk], stats,
                                              budget=budget, limits=limits, origin=origin)
        for p, s, f, e in zip(pts[start:start + per_chunk].tolist(), score.tolist(),
                              flat.tolist(), exact.tolist()):
            matches.append(Match((p[0], p[1]), (float(f % width), float(f // width)), s, e))
    return matches


def _cell_centres(h: int, w: int, size: tuple[int, int]) -> torch.Tensor:
    """Pixel coordinates [h*w, 2] of each feature cell's centre in an image of size (W, H)."""
    width, height = size
    ys = (torch.arange(h) + 0.5) * height / h - 0.5
    xs = (torch.arange(w) + 0.5) * width / w - 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)


def _best(a: torch.Tensor, b: torch.Tensor, budget: int, deadline: float | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of a [N, C], the index and cosine of its nearest row of b [M, C]."""
    step = max(1, budget // max(1, len(b)))
    values, indices = [], []
    for start in range(0, len(a), step):
        _check(deadline)
        v, i = (a[start : start + step] @ b.T).max(dim=1)
        values.append(v)
        indices.append(i)
    return torch.cat(values), torch.cat(indices)


def mutual_matches(
    source: torch.Tensor,
    target: torch.Tensor,
    source_size: tuple[int, int],
    target_size: tuple[int, int],
    *,
    max_matches: int,
    budget: int = DEFAULT_BUDGET,
    deadline: float | None = None,
) -> list[Match]:
    """Mutual nearest neighbours between feature cells, best cosine first."""
    a = F.normalize(source.float().flatten(1).T, dim=1)  # [N, C]
    b = F.normalize(target.float().flatten(1).T, dim=1)  # [M, C]
    score_ab, ab = _best(a, b, budget, deadline)
    _, ba = _best(b, a, budget, deadline)
    mutual = torch.nonzero(ba[ab] == torch.arange(len(a), device=a.device)).flatten()
    order = mutual[score_ab[mutual].argsort(descending=True, stable=True)][:max_matches]
    ab, score_ab = ab.cpu(), score_ab.cpu()
    src_xy = _cell_centres(source.shape[1], source.shape[2], source_size)
    tgt_xy = _cell_centres(target.shape[1], target.shape[2], target_size)
    return [
        Match(tuple(src_xy[i].tolist()), tuple(tgt_xy[ab[i]].tolist()), float(score_ab[i]))
        for i in order.cpu().tolist()
    ]


def similarity_map(source: torch.Tensor, target: torch.Tensor, point: list[float],
                   source_size: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity [h, w] of one source point to every target feature cell."""
    query = sample_points(source, torch.tensor([point], dtype=torch.float32), source_size)[0]
    return F.cosine_similarity(target.float(), query[:, None, None], dim=0)


def correspond(
    source: torch.Tensor,
    target: torch.Tensor,
    source_size: tuple[int, int],
    target_size: tuple[int, int],
    points: list[list[float]] | None,
    *,
    max_matches: int,
    deadline: float | None = None,
    limits: Limits = Limits(),
    stats: Refinement | None = None,
) -> list[Match]:
    """Matches for given source points, or mutual nearest neighbours when there are none."""
    if points is None:
        return mutual_matches(source, target, source_size, target_size,
                              max_matches=max_matches, deadline=deadline)
    return match_points(source, target, points, source_size, target_size, deadline=deadline,
                        limits=limits, stats=stats)


__all__ = ["DeadlinePassed", "Limits", "Match", "NonFiniteFeatures", "Refinement", "correspond",
           "match_points", "mutual_matches", "sample_points", "similarity_map"]
