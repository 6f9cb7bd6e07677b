"""Semantic correspondence by cosine similarity of feature maps (the DIFT protocol).

DIFT upsamples both maps to the original image sizes and takes an argmax of the cosine.
We compute the same argmax without ever holding C x H x W at full resolution: the dot
product commutes with bilinear upsampling, so only a [P, H, W] similarity (chunked over
points) and an [H, W] norm map (chunked over rows) are materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_BUDGET = 1 << 24  # elements held at once in any full-resolution intermediate


@dataclass(frozen=True)
class Match:
    source: tuple[float, float]
    target: tuple[float, float]
    score: float

    def to_json(self) -> dict[str, object]:
        return {"source": list(self.source), "target": list(self.target), "score": self.score}


def sample_points(feat: torch.Tensor, points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear features [P, C] at pixel points [P, 2] of an image of size (W, H).

    Identical to reading the map upsampled to (H, W) at those pixels (half-pixel centres,
    border clamping), as F.interpolate(align_corners=False) does.
    """
    width, height = size
    grid = torch.empty_like(points, dtype=torch.float32)
    grid[:, 0] = (points[:, 0] + 0.5) / width * 2 - 1
    grid[:, 1] = (points[:, 1] + 0.5) / height * 2 - 1
    out = F.grid_sample(
        feat[None].float(),
        grid.to(feat.device)[None, None],
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return out[0, :, 0].T  # [P, C]


def _axis_weights(n_in: int, n_out: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices and weights of 1-D bilinear upsampling n_in -> n_out (align_corners=False)."""
    src = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5)
    src = src.clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).float()


def upsampled_inv_norm(feat: torch.Tensor, size: tuple[int, int], budget: int) -> torch.Tensor:
    """1 / ||upsample(feat)|| at every pixel, [H, W], at O(H W) cost whatever C is.

    An upsampled vector mixes the four cell corners a, b, c, d around it, so its squared
    norm is a quadratic form in the corner weights over ten low-resolution inner-product
    maps (four norms, six cross terms) computed once at C x h x w cost.
    """
    width, height = size
    h, w = feat.shape[1:]
    padded = F.pad(feat.float()[None], (0, 1, 0, 1), mode="replicate")[0]
    corners = [padded[:, :h, :w], padded[:, :h, 1:], padded[:, 1:, :w], padded[:, 1:, 1:]]
    pairs = [(i, j) for i in range(4) for j in range(i, 4)]
    maps = torch.stack([(corners[i] * corners[j]).sum(0) for i, j in pairs])  # [10, h, w]
    y0, _, ty = _axis_weights(h, height, feat.device)
    x0, _, tx = _axis_weights(w, width, feat.device)
    rows = max(1, budget // (len(pairs) * width))
    out = torch.empty(height, width, device=feat.device)
    for start in range(0, height, rows):
        sl = slice(start, start + rows)
        vy = ty[sl][:, None]
        weights = [(1 - vy) * (1 - tx), (1 - vy) * tx, vy * (1 - tx), vy * tx]  # [r, W] each
        local = maps[:, y0[sl]][:, :, x0]  # [10, r, W]
        total = torch.zeros_like(local[0])
        for k, (i, j) in enumerate(pairs):
            total += (1 if i == j else 2) * weights[i] * weights[j] * local[k]
        out[sl] = total.clamp_min_(1e-24).rsqrt_()
    return out


def match_points(
    source: torch.Tensor,
    target: torch.Tensor,
    points: list[list[float]] | torch.Tensor,
    source_size: tuple[int, int],
    target_size: tuple[int, int],
    *,
    budget: int = DEFAULT_BUDGET,
) -> list[Match]:
    """For each source point (x, y), the target pixel of highest cosine similarity."""
    pts = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
    if len(pts) == 0:
        return []
    width, height = target_size
    query = sample_points(source, pts, source_size)  # [P, C]
    query = query / query.norm(dim=1, keepdim=True).clamp_min(1e-12)
    inv_norm = upsampled_inv_norm(target, target_size, budget)
    tgt = target.float()
    per_chunk = max(1, budget // (height * width))
    matches: list[Match] = []
    for start in range(0, len(pts), per_chunk):
        q = query[start : start + per_chunk]
        dots = torch.einsum("pc,chw->phw", q, tgt)[:, None]
        sim = F.interpolate(dots, size=(height, width), mode="bilinear", align_corners=False)
        sim = sim[:, 0] * inv_norm
        score, flat = sim.flatten(1).max(dim=1)
        for p, s, f in zip(pts[start : start + per_chunk].tolist(), score.tolist(), flat.tolist()):
            matches.append(Match((p[0], p[1]), (float(f % width), float(f // width)), s))
    return matches


def _cell_centres(h: int, w: int, size: tuple[int, int]) -> torch.Tensor:
    """Pixel coordinates [h*w, 2] of each feature cell's centre in an image of size (W, H)."""
    width, height = size
    ys = (torch.arange(h) + 0.5) * height / h - 0.5
    xs = (torch.arange(w) + 0.5) * width / w - 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)


def _best(a: torch.Tensor, b: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of a [N, C], the index and cosine of its nearest row of b [M, C]."""
    step = max(1, budget // max(1, len(b)))
    values, indices = [], []
    for start in range(0, len(a), step):
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
) -> list[Match]:
    """Mutual nearest neighbours between feature cells, best cosine first."""
    a = F.normalize(source.float().flatten(1).T, dim=1)  # [N, C]
    b = F.normalize(target.float().flatten(1).T, dim=1)  # [M, C]
    score_ab, ab = _best(a, b, budget)
    _, ba = _best(b, a, budget)
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
) -> list[Match]:
    """Matches for given source points, or mutual nearest neighbours when there are none."""
    if points is None:
        return mutual_matches(source, target, source_size, target_size, max_matches=max_matches)
    return match_points(source, target, points, source_size, target_size)
