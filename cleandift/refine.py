"""DIFT's argmax over the upsampled cosine map, exactly, without building that map.

Upsampling is bilinear (F.interpolate, align_corners=False): a target pixel's feature mixes
the (at most) four grid features around it, a "patch" of the grid: F = sum_i w_i f_i. Its
cosine with a unit query q is sum_i w_i (q . f_i) / sqrt(w^T G w): four dot products and the
patch's 4 x 4 Gram matrix G give any pixel at O(1), whatever C is, and a whole patch at
O(its rows) (`Target.evaluate`).

No pixel of a patch can beat ||P q||, the norm of q projected on the span of the patch's
corners (every F lies in that span). Patches are evaluated best bound first, in growing
blocks, until the best pixel found beats every remaining bound: the answer is then DIFT's
argmax, however many patches that takes. Everything is float64, and the bound is made safe
against rounding (`Target.bounds`): where it cannot be (a patch whose corners are linearly
dependent to within rounding, e.g. a flat region), the patch is simply always evaluated.

The cost is therefore bounded by evaluating every patch: 4 candidates per target row per
patch column, `Target.worst_case` per point. A caller may stop earlier (a time or a
candidate limit); the points whose search was still open are then reported as not exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

UNIT_ROUNDOFF = 2.0 ** -53  # float64
# A Gram eigenvalue within this factor of its rounding error leaves the bound unprovable:
# the patch is then evaluated whatever its bound.
CONDITION_MARGIN = 1e4
# Relative and absolute slack added to every bound, far above float64 rounding of the
# projection (the errors the bound's derivation accounts for are ~1e-12 at most).
BOUND_SLACK = 1e-9
UNPRUNABLE = 2.0  # above any cosine
# A pixel row along which ||F||^2 dips below this fraction of the patch's largest corner
# norm^2 nearly cancels: the Gram formula's rounding (~C u ||f||^2) is then no longer small
# against ||F||^2, so that row is evaluated explicitly in channel space instead.
FRAGILE = 0.25
NORM_EPS = 1e-12  # F.normalize's eps: DIFT's cosine of a (near) zero vector
EXPLICIT_ELEMENTS = 1 << 22  # channel-space values held at once by explicit rows


@dataclass
class Refinement:
    """What a search cost: points, patches and candidate pixels evaluated, and the points
    whose search a limit stopped before the bound proved the answer."""

    points: int = 0
    patches: int = 0
    pixels: int = 0
    inexact: int = 0


@dataclass(frozen=True)
class Limits:
    """When to stop refining and answer with what has been found (marked not exact)."""

    stop_at: float | None = None  # time.time() after which no further block starts
    max_pixels: int | None = None  # candidate pixels evaluated for the whole call
    stop: Callable[[], bool] | None = None  # asked between blocks: nobody wants the answer

    def reached(self, stats: Refinement, pixels_at_start: int) -> bool:
        if self.stop_at is not None and time.time() > self.stop_at:
            return True
        if self.stop is not None and self.stop():
            return True
        return self.max_pixels is not None and stats.pixels - pixels_at_start >= self.max_pixels


def axis_weights(n_in: int, n_out: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output position: the low-res cell index i0 and the weight of cell i0 + 1
    (F.interpolate's bilinear, align_corners=False: half-pixel centres, clamped). Past the
    last cell's centre the weight is exactly 0, so the padded corner never counts."""
    scale = n_in / n_out  # as upsample_bilinear2d computes it, to round alike
    src = scale * (torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) - 0.5
    src = src.clamp(min=0, max=n_in - 1)
    i0 = src.floor().long().clamp(max=n_in - 1)
    return i0, src - i0


def _corners(grid: torch.Tensor) -> list[torch.Tensor]:
    """The four corners of every patch of a [N, h, w] grid, each flattened to [N, h*w]
    (the last row and column replicate: their weight is 0, see axis_weights)."""
    padded = F.pad(grid, (0, 1, 0, 1), mode="replicate")
    return [padded[:, :-1, :-1].flatten(1), padded[:, :-1, 1:].flatten(1),
            padded[:, 1:, :-1].flatten(1), padded[:, 1:, 1:].flatten(1)]


class Target:
    """A target feature map prepared once for any number of queries."""

    def __init__(self, feat: torch.Tensor, size: tuple[int, int]) -> None:
        self.width, self.height = size
        self.channels, self.h, self.w = (int(s) for s in feat.shape)
        device = feat.device
        grid = feat.double()
        self.flat = grid.flatten(1)  # [C, h*w]
        corners = _corners(grid)
        gram = torch.empty(self.h * self.w, 4, 4, device=device, dtype=torch.float64)
        for i in range(4):
            for j in range(i, 4):
                gram[:, i, j] = gram[:, j, i] = (corners[i] * corners[j]).sum(0)
        self.gram = gram  # with the replicated corners: what `evaluate` weighs
        index = torch.arange(self.h * self.w, device=device, dtype=torch.float64)
        self.corner_index = torch.stack(_corners(index.reshape(1, self.h, self.w)),
                                        dim=-1)[0].long()  # [h*w, 4] flat grid indices
        self.real = self._real_corners(device)  # [h*w, 4]: corners that get weight
        self._prepare_bound(gram)
        self.row_cell, self.row_t = axis_weights(self.h, self.height, device)
        self.col_cell, self.col_t = axis_weights(self.w, self.width, device)
        self.row_start, self.row_count = _ranges(self.row_cell, self.h)
        self.col_start, self.col_count = _ranges(self.col_cell, self.w)
        self.max_rows = int(self.row_count.max())
        self.max_cols = int(self.col_count.max())
        rows = self.row_count.repeat_interleave(self.w)
        cols = self.col_count.repeat(self.h)
        self.empty = (rows == 0) | (cols == 0)  # patches no target pixel maps to
        self.patch_pixels = 4 * rows  # candidates evaluated per patch (4 per row)

    @property
    def worst_case(self) -> int:
        """Candidate pixels one point costs if no patch can be pruned."""
        return int(self.patch_pixels[~self.empty].sum())

    def _real_corners(self, device: torch.device) -> torch.Tensor:
        real = torch.ones(self.h, self.w, 4, dtype=torch.bool, device=device)
        real[:, -1, 1] = real[:, -1, 3] = False  # last column: no right neighbour
        real[-1, :, 2] = real[-1, :, 3] = False  # last row: no lower neighbour
        return real.reshape(-1, 4)

    def _prepare_bound(self, gram: torch.Tensor) -> None:
        """Eigen-decompose each patch's Gram matrix over its real corners (a padded corner
        is decoupled: unit diagonal, zero dot, so it adds nothing) in float64."""
        fake = ~self.real
        g = gram.clone()
        g[fake[:, :, None] | fake[:, None, :]] = 0.0
        scale = torch.diagonal(g, dim1=1, dim2=2).amax(1).clamp_min(1e-300)  # max |f_i|^2
        self.scale = scale
        diag = torch.diagonal(g, dim1=1, dim2=2)
        diag += torch.where(fake, scale[:, None], 0.0)
        values, vectors = torch.linalg.eigh(g)
        # Rounding of the Gram entries (C products summed) and of the eigen solver.
        error = 4 * (self.channels + 16) * UNIT_ROUNDOFF * scale
        self.eig_values = values - error[:, None]  # never above the true eigenvalue
        self.eig_vectors = vectors  # [h*w, 4, 4], columns
        self.provable = (values > CONDITION_MARGIN * error[:, None]).all(1)
        self.dot_error = 2 * (self.channels + 8) * UNIT_ROUNDOFF * scale.sqrt()

    def corner_dots(self, queries: torch.Tensor) -> torch.Tensor:
        """[P, h*w, 4]: each patch's four corner dot products with unit queries [P, C]."""
        dots = (queries.double() @ self.flat).reshape(-1, self.h, self.w)
        return torch.stack(_corners(dots), dim=-1)

    def bounds(self, b4: torch.Tensor) -> torch.Tensor:
        """[P, h*w]: a safe upper bound of the cosine anywhere in each patch.

        ||P q||^2 = sum_k (v_k . b)^2 / lambda_k over the eigenpairs of the real corners'
        Gram matrix (b: the corner dots). Each term is enlarged by the rounding bounds of
        b (dot_error) and of lambda_k (subtracted above), and the root gets BOUND_SLACK;
        patches whose smallest eigenvalue is within CONDITION_MARGIN of its error are
        UNPRUNABLE; patches without pixels are -inf.
        """
        b = b4 * self.real  # a padded corner's dot does not count
        projected = torch.einsum("pki,kij->pkj", b, self.eig_vectors).abs()
        projected = projected + 2 * self.dot_error[None, :, None]
        square = (projected ** 2 / self.eig_values.clamp_min(1e-300)[None]).sum(-1)
        bound = square.sqrt() * (1 + BOUND_SLACK) + BOUND_SLACK
        bound = torch.where(self.provable[None], bound.clamp(max=UNPRUNABLE), UNPRUNABLE)
        return bound.masked_fill(self.empty[None], float("-inf"))

    def evaluate(self, patch: torch.Tensor, b4: torch.Tensor, queries: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best cosine and its flat pixel index (y * W + x, the first in row-major order
        on ties) inside one patch per query: patch [P], b4 [P, 4] its corner dots, queries
        [P, C] the unit queries (for rows that must be evaluated explicitly).

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
        x_star = ((j[:, None] + t_star + 0.5) * self.width / self.w - 0.5).clamp(-1, self.width)
        below = x_star.floor().long()
        cols = torch.stack([first.expand_as(below), last.expand_as(below), below, below + 1], -1)
        cols = torch.maximum(torch.minimum(cols, last[..., None]), first[..., None])
        tx = self.col_t[cols]  # [P, R, 4]
        numerator = a[..., None] + beta[..., None] * tx
        norm2 = gamma[..., None] + delta[..., None] * tx + eps[..., None] * tx ** 2
        value = numerator * torch.rsqrt(norm2.clamp_min(NORM_EPS ** 2))
        fragile = row_ok & (_least_on_unit(gamma, delta, eps)
                            < FRAGILE * self.scale[patch][:, None])
        value = value.masked_fill(~(row_ok & ~fragile)[..., None], float("-inf"))
        flat = rows[..., None] * self.width + cols
        best, first = _first_best(value.flatten(1), flat.flatten(1))
        if bool(fragile.any()):
            self._explicit_rows(patch, rows, fragile, queries, best, first)
        return best, first

    def _explicit_rows(self, patch: torch.Tensor, rows: torch.Tensor, fragile: torch.Tensor,
                       queries: torch.Tensor, best: torch.Tensor, first: torch.Tensor) -> None:
        """Every pixel of the fragile rows, as DIFT computes it: the interpolated vector in
        channel space, its cosine with the query (F.normalize's eps); folded into best."""
        entry, row_of = fragile.nonzero(as_tuple=True)
        step = max(1, EXPLICIT_ELEMENTS // (self.max_cols * self.channels))
        arange = torch.arange(self.max_cols, device=patch.device)
        for lo in range(0, len(entry), step):
            e = entry[lo:lo + step]
            row = rows[e, row_of[lo:lo + step]]
            j = patch[e] % self.w
            cols = self.col_start[j][:, None] + arange
            ok = arange[None] < self.col_count[j][:, None]
            cols = cols.clamp(max=self.width - 1)
            ty, tx = self.row_t[row][:, None, None], self.col_t[cols][..., None]
            f = self.flat.T[self.corner_index[patch[e]]]  # [N, 4, C]
            mixed = ((1 - ty) * ((1 - tx) * f[:, None, 0] + tx * f[:, None, 1])
                     + ty * ((1 - tx) * f[:, None, 2] + tx * f[:, None, 3]))  # [N, K, C]
            value = torch.einsum("nkc,nc->nk", mixed, queries[e])
            value = value / mixed.norm(dim=-1).clamp_min(NORM_EPS)
            value = value.masked_fill(~ok, float("-inf"))
            row_best, row_flat = _first_best(value, row[:, None] * self.width + cols)
            _merge(best, first, e, row_best, row_flat)


def _first_best(value: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the best value and, among its ties, the smallest flat index (DIFT's argmax
    returns the first maximum in row-major order)."""
    best = value.max(dim=1).values
    ties = value == best[:, None]
    first = torch.where(ties, flat, torch.iinfo(torch.long).max).min(1).values
    return best, first


def _least_on_unit(c: torch.Tensor, d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """min over t in [0, 1] of c + d t + e t^2 (a row's squared norm)."""
    t = torch.where(e > 0, (-d / (2 * e).clamp_min(1e-300)).clamp(0, 1), 0.0)
    inner = c + d * t + e * t ** 2
    return torch.minimum(torch.minimum(c, c + d + e), inner)


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


MAX_BLOCK = 64  # patches per point evaluated between two checks of the bounds


def argmax_upsampled(target: Target, queries: torch.Tensor, stats: Refinement, *,
                     budget: int, limits: Limits = Limits(), origin: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cosine, flat pixel index, exact) of each unit query's best target pixel.

    All points advance together through their patches sorted by bound, in blocks that
    double up to MAX_BLOCK; a point is done once its next bound is below its best pixel.
    `budget` caps the elements held at once. `limits` may stop the search between two
    evaluations, but never before each point's best-bound patch is evaluated (so every
    point has an answer); `origin` is the stats.pixels value its candidate limit counts
    from (default: now).
    """
    queries = queries.double()
    b4 = target.corner_dots(queries)
    order_bounds, order = target.bounds(b4).sort(dim=1, descending=True, stable=True)
    n, patches = order.shape
    device = queries.device
    best = torch.full((n,), float("-inf"), dtype=torch.float64, device=device)
    best_flat = torch.zeros(n, dtype=torch.long, device=device)
    active = order_bounds[:, 0] > float("-inf")
    origin = stats.pixels if origin is None else origin
    start, step, stopped = 0, 1, False
    per_call = max(1, budget // (16 * 4 * max(target.max_rows, target.max_cols)))
    while bool(active.any()) and not stopped:
        stop = min(start + step, patches)
        todo = active.nonzero().flatten()
        block = order[todo, start:stop].flatten()
        owner = todo.repeat_interleave(stop - start)
        live = order_bounds[todo, start:stop].flatten() > float("-inf")
        block, owner = block[live], owner[live]
        for lo in range(0, len(block), per_call):
            if start > 0 and limits.reached(stats, origin):
                stopped = True  # the points of this block stay open: not exact
                break
            patch, who = block[lo:lo + per_call], owner[lo:lo + per_call]
            value, flat = target.evaluate(patch, b4[who, patch], queries[who])
            _merge(best, best_flat, who, value, flat)
            stats.patches += len(patch)
            stats.pixels += int(target.patch_pixels[patch].sum())
        if stopped:
            break
        start, step = stop, min(2 * step, MAX_BLOCK)
        if start >= patches:
            active[:] = False
        else:  # done once no unseen patch can beat (or tie before) the best pixel found
            active &= order_bounds[:, start] >= best
    stats.points += n
    stats.inexact += int(active.sum())
    return best, best_flat, ~active


def _merge(best: torch.Tensor, best_flat: torch.Tensor, who: torch.Tensor,
           value: torch.Tensor, flat: torch.Tensor) -> None:
    """Fold candidates (value, flat) of points `who` (repeats allowed) into each point's
    best, keeping the first pixel in row-major order among equal values."""
    top = torch.full_like(best, float("-inf")).scatter_reduce(0, who, value, "amax")
    at_top = value == top[who]
    first = torch.full_like(best_flat, torch.iinfo(torch.long).max).scatter_reduce(
        0, who[at_top], flat[at_top], "amin")
    better = (top > best) | ((top == best) & (first < best_flat))
    best.copy_(torch.where(better, top, best))
    best_flat.copy_(torch.where(better, first, best_flat))
