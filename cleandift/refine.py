"""DIFT's argmax over the upsampled cosine map, at a cost that does not grow with the
target's pixel count.

Upsampling is bilinear, so a target pixel's feature mixes the four feature cells around
it (a "patch" of the low-resolution grid): F = sum_i w_i f_i. Its cosine with a query q
is sum_i w_i (q . f_i) / sqrt(sum_ij w_i w_j (f_i . f_j)): four dot products and a 4 x 4
Gram matrix per patch give any pixel of the patch at O(1), whatever C is, and a whole
patch at O(its rows) (see `Target.evaluate`).

And no pixel of a patch can beat ||P q||, the norm of q projected on the span of the
patch's four corners (each F lies in that span). So patches are refined best bound first
and the search stops as soon as the best pixel found beats every remaining bound: the
answer is then exactly DIFT's. At most `refine` patches are evaluated per point, which
bounds the cost; a point whose search was cut there keeps the best pixel of the patches
it evaluated (`Refinement.cut` counts them; on real features it stays at zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAIRS = [(i, j) for i in range(4) for j in range(i, 4)]  # the 10 distinct Gram entries


@dataclass
class Refinement:
    """What a search cost: points, patches and pixels evaluated, points cut short."""

    points: int = 0
    patches: int = 0
    pixels: int = 0
    cut: int = 0


def axis_weights(n_in: int, n_out: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output position: the low-res cell index i0 and the weight of cell i0 + 1
    (F.interpolate's bilinear, align_corners=False: half-pixel centres, clamped)."""
    src = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5)
    src = src.clamp(min=0, max=n_in - 1)  # past the last cell the map is flat: weight 0,
    i0 = src.floor().long().clamp(max=n_in - 1)  # so those pixels tie exactly, as they should
    return i0, (src - i0).float()


class Target:
    """A target feature map prepared once for any number of queries."""

    def __init__(self, feat: torch.Tensor, size: tuple[int, int]) -> None:
        self.width, self.height = size
        self.h, self.w = int(feat.shape[1]), int(feat.shape[2])
        self.flat = feat.float().flatten(1)  # [C, h*w]
        device = feat.device
        padded = F.pad(feat.float()[None], (0, 1, 0, 1), mode="replicate")[0]
        corners = [padded[:, :-1, :-1], padded[:, :-1, 1:], padded[:, 1:, :-1], padded[:, 1:, 1:]]
        gram = torch.empty(self.h * self.w, 4, 4, device=device)
        for i, j in PAIRS:
            gram[:, i, j] = gram[:, j, i] = (corners[i] * corners[j]).sum(0).flatten()
        self.gram = gram
        self.gram_pinv = torch.linalg.pinv(gram.double()).float()
        self.row_cell, self.row_t = axis_weights(self.h, self.height, device)
        self.col_cell, self.col_t = axis_weights(self.w, self.width, device)
        self.row_start, self.row_count = _ranges(self.row_cell, self.h)
        self.col_start, self.col_count = _ranges(self.col_cell, self.w)
        self.max_rows, self.max_cols = int(self.row_count.max()), int(self.col_count.max())

    @property
    def patch_cost(self) -> int:
        """Pixels evaluated per patch: four candidates per row."""
        return 4 * self.max_rows

    def corner_dots(self, queries: torch.Tensor) -> torch.Tensor:
        """[P, h*w, 4]: each patch's four corner dot products with unit queries [P, C]."""
        dots = (queries @ self.flat).reshape(-1, 1, self.h, self.w)
        padded = F.pad(dots, (0, 1, 0, 1), mode="replicate")[:, 0]
        corners = [padded[:, :-1, :-1], padded[:, :-1, 1:], padded[:, 1:, :-1], padded[:, 1:, 1:]]
        return torch.stack([c.flatten(1) for c in corners], dim=-1)

    def bounds(self, b4: torch.Tensor) -> torch.Tensor:
        """[P, h*w] upper bound of the cosine inside each patch (-inf for empty patches)."""
        square = torch.einsum("pki,kij,pkj->pk", b4, self.gram_pinv, b4).clamp_min(0)
        rows = self.row_count.repeat_interleave(self.w)
        cols = self.col_count.repeat(self.h)
        return square.sqrt().masked_fill((rows == 0) | (cols == 0), float("-inf"))

    def evaluate(self, patch: torch.Tensor, b4: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best cosine and its flat pixel index (y * W + x, the first in row-major order
        on ties) inside one patch per query: patch [P], b4 [P, 4] its corner dots.

        Along a row of a patch the feature moves on a segment L -> R, and the cosine is
        (a + b t) / sqrt(c + d t + e t^2) in the column weight t: its derivative has a
        linear numerator, so it has one critical point at most. A row's best pixel is
        therefore an end of the row or a neighbour of that point: four candidates per
        row, whatever the row's length.
        """
        i, j = patch // self.w, patch % self.w
        rows = self.row_start[i][:, None] + torch.arange(self.max_rows, device=patch.device)
        row_ok = rows < (self.row_start[i] + self.row_count[i])[:, None]
        rows = rows.clamp(max=self.height - 1)
        ty = self.row_t[rows]  # [P, R]
        a, b = _segment(ty, b4[:, 0:1], b4[:, 2:3]), _segment(ty, b4[:, 1:2], b4[:, 3:4])
        g = self.gram[patch]
        left = _quadratic(ty, g[:, 0, 0:1], g[:, 0, 2:3], g[:, 2, 2:3])
        right = _quadratic(ty, g[:, 1, 1:2], g[:, 1, 3:4], g[:, 3, 3:4])
        cross = ((1 - ty) ** 2 * g[:, 0, 1:2] + ty * (1 - ty) * (g[:, 0, 3:4] + g[:, 1, 2:3])
                 + ty ** 2 * g[:, 2, 3:4])
        beta, gamma, delta = b - a, left, 2 * (cross - left)
        eps = left - 2 * cross + right
        slope = beta * delta / 2 - a * eps
        t_star = -(beta * gamma - a * delta / 2) / torch.where(slope == 0, 1.0, slope)
        t_star = torch.where((slope == 0) | ~torch.isfinite(t_star), 0.0, t_star)
        first = self.col_start[j][:, None]
        last = first + self.col_count[j][:, None] - 1
        x_star = (j[:, None] + t_star + 0.5) * self.width / self.w - 0.5
        below = x_star.floor().long()
        cols = torch.stack([first.expand_as(below), last.expand_as(below), below, below + 1], -1)
        cols = torch.maximum(torch.minimum(cols, last[..., None]), first[..., None])
        tx = self.col_t[cols]  # [P, R, 4]
        numerator = a[..., None] + beta[..., None] * tx
        norm2 = gamma[..., None] + delta[..., None] * tx + eps[..., None] * tx ** 2
        value = numerator * torch.rsqrt(norm2.clamp_min(1e-24))
        value = value.masked_fill(~row_ok[..., None], float("-inf"))
        flat = rows[..., None] * self.width + cols
        best = value.flatten(1).max(dim=1).values
        ties = value.flatten(1) == best[:, None]
        first_best = torch.where(ties, flat.flatten(1), torch.iinfo(torch.long).max).min(1).values
        return best, first_best


def _segment(t: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    return (1 - t) * start + t * end


def _quadratic(t: torch.Tensor, aa: torch.Tensor, ab: torch.Tensor, bb: torch.Tensor
               ) -> torch.Tensor:
    """||(1 - t) A + t B||^2 from the Gram entries of A and B."""
    return (1 - t) ** 2 * aa + 2 * t * (1 - t) * ab + t ** 2 * bb


def _ranges(cells: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each low-res index, the first output position mapping to it and how many do
    (output positions map to cells in increasing order, so each set is a range)."""
    count = torch.bincount(cells, minlength=n)
    start = torch.cumsum(count, 0) - count
    return start, count


def argmax_upsampled(target: Target, queries: torch.Tensor, refine: int,
                     stats: Refinement) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, flat pixel index) of each unit query's best target pixel."""
    b4 = target.corner_dots(queries)
    bounds = target.bounds(b4)
    refine = min(refine, bounds.shape[1])
    order_bounds, order = bounds.topk(refine, dim=1)
    n = len(queries)
    best = torch.full((n,), float("-inf"), device=queries.device)
    best_flat = torch.zeros(n, dtype=torch.long, device=queries.device)
    active = torch.ones(n, dtype=torch.bool, device=queries.device)
    arange = torch.arange(n, device=queries.device)
    for k in range(refine):
        todo = arange[active & (order_bounds[:, k] > float("-inf"))]
        if len(todo) == 0:
            break
        patch = order[todo, k]
        value, flat = target.evaluate(patch, b4[todo, patch])
        better = (value > best[todo]) | ((value == best[todo]) & (flat < best_flat[todo]))
        best[todo] = torch.where(better, value, best[todo])
        best_flat[todo] = torch.where(better, flat, best_flat[todo])
        stats.patches += len(todo)
        stats.pixels += len(todo) * target.patch_cost
        if k + 1 < refine:  # done once no unseen patch can beat the best pixel found
            active &= order_bounds[:, k + 1] >= best
    if refine < bounds.shape[1]:
        stats.cut += int((active & (bounds.topk(refine + 1, dim=1).values[:, -1] >= best)).sum())
    stats.points += n
    return best, best_flat
