"""What one request costs a worker, as one number: the API refuses a request over the
per-job ceiling (422) before it is queued, instead of letting it hold a worker for
minutes. Pure Python, no torch, so the API process can use it.

The unit is the megapixel-pass: one full UNet pass over a 1000 x 1000 px input. What
multiplies a worker's time is counted: the images (a /correspond's source and each
target), size² (the input side, squared, times 1 + size² in megapixels: self-attention
grows with the square of the pixel count, and on 2 CPU cores a 960 px pass costs twice
per pixel what a 256 px one does), the passes (1 clean, DIFT's ensemble of 8),
the layers (the UNet stops after the deepest requested key, see layers.py), the VAE
encoder (once per image), the points matched in each target and, without points, the
mutual nearest neighbours (every source cell against every target cell). Matching is
bounded on its own as well (Settings.match_max_pixels); these terms keep a request of
many points or cells and many targets from passing as cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .contract import RequestError
from .method import DIFT_ENSEMBLE, LAYER_KEYS

UNIT = "megapixel-passes"
ENCODE_SHARE = 0.5  # the VAE encoder, run once per image, in full UNet passes
SHALLOWEST_SHARE = 0.5  # encoder half of the UNet: what even `mid` needs
POINT_COST = 0.001  # one source point matched in one target (about 1.5 ms on 2 CPU cores)
PAIR_COST = 1.5e-8  # one source cell compared with one target cell (mutual neighbours)


class TooCostly(RequestError):
    """The request would hold a worker longer than the per-job ceiling allows (422)."""


@dataclass(frozen=True)
class Cost:
    images: int
    passes: int
    size: int
    depth: float  # share of the UNet run, by the deepest key
    points: int
    targets: int
    cells: int = 0  # feature cells of one image in the matched layer (/correspond)

    @property
    def forward(self) -> float:
        megapixels = self.size * self.size / 1e6
        per_pass = megapixels * (1 + megapixels)  # convolutions, plus attention's square
        return self.images * per_pass * (ENCODE_SHARE + self.passes * self.depth)

    @property
    def matching(self) -> float:
        if self.points:
            return self.points * self.targets * POINT_COST
        return self.targets * self.cells * self.cells * PAIR_COST

    @property
    def total(self) -> float:
        return self.forward + self.matching

    def describe(self) -> str:
        parts = f"{self.images} image(s) x {self.passes} pass(es) at {self.size}x{self.size}"
        if self.points and self.targets:
            parts += f", {self.points} point(s) x {self.targets} target(s)"
        elif self.cells and self.targets:
            parts += f", {self.cells}² cell pairs x {self.targets} target(s)"
        return parts


def unet_depth(layers: Sequence[str]) -> float:
    """The share of a UNet pass that runs: it stops after the deepest requested key."""
    deepest = max((LAYER_KEYS.index(k) for k in layers), default=len(LAYER_KEYS) - 1)
    return SHALLOWEST_SHARE + (1 - SHALLOWEST_SHARE) * (deepest + 1) / len(LAYER_KEYS)


def request_cost(*, kind: str, mode: str, size: int, layers: Sequence[str], images: int,
                 points: int, stride: int = 0) -> Cost:
    """The cost of one request; `images` counts a /correspond's source and targets,
    `stride` is the matched layer's (input pixels per feature cell)."""
    targets = images - 1 if kind == "correspond" else 0
    cells = (size // stride) ** 2 if stride and kind == "correspond" else 0
    return Cost(images=images, passes=DIFT_ENSEMBLE if mode == "dift" else 1, size=size,
                depth=unet_depth(layers), points=points, targets=targets, cells=cells)


def check_cost(cost: Cost, ceiling: float) -> None:
    """Refuse, saying what the request costs, what the ceiling is, and what helps."""
    if cost.total <= ceiling:
        return
    hints = ["a smaller size"]
    if cost.passes > 1:
        hints.append("mode=clean (1 pass instead of 8)")
    if cost.targets > 1:
        hints.append("fewer targets per request")
    if cost.matching > ceiling / 4:
        hints.append("fewer points")
    raise TooCostly(f"this request would cost {cost.total:.1f} {UNIT} of worker time "
                    f"({cost.describe()}); the per-job ceiling is {ceiling:g} "
                    f"(limits.max_job_cost in GET /v1/models): try {', or '.join(hints)}")
