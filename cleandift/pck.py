"""PCK (percentage of correct keypoints) along its three independent axes, every
combination reported, so that each number can stand beside a paper's that names its own.

Papers differ on each axis, and a difference on any one of them moves PCK by more than
the gains being compared, so a report that hides one of them cannot be compared at all:

- comparison: `le` counts a keypoint correct at distance <= alpha * side (DIFT's
  evaluation); `lt` at distance < alpha * side (CleanDIFT's own evaluation code, a fork of
  GeoAware-SC's). They differ only for a distance exactly on the threshold, which integer
  pixel predictions and integer annotations make common enough to matter.
- threshold: `bbox` takes side = max(w, h) of the target's annotated bounding box
  (PCK_bbox); `img` takes side = max(w, h) of the target image in its original pixels,
  before any resize to the model's input (PCK_img).
- averaging: `per_image` is the mean over pairs of each pair's fraction of correct
  keypoints (DIFT's "per image"; one pair has one target image); `per_keypoint` pools all
  keypoints of all pairs (DIFT's "per point").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

ALPHAS = (0.05, 0.10, 0.15)
COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "le": lambda d, limit: d <= limit, "lt": lambda d, limit: d < limit}
THRESHOLDS = ("bbox", "img")
AVERAGINGS = ("per_image", "per_keypoint")

# The report's legend: what each key of `pck[comparison][threshold][averaging][alpha]` means.
PROTOCOL: dict[str, Any] = {
    "layout": "pck[comparison][threshold][averaging][alpha], in percent",
    "comparison": {
        "le": "correct if distance <= alpha * side (DIFT's evaluation)",
        "lt": "correct if distance < alpha * side (CleanDIFT's evaluation code)",
    },
    "threshold": {
        "bbox": "side = max(w, h) of the target's bounding box (PCK_bbox)",
        "img": "side = max(w, h) of the target image, original pixels (PCK_img)",
    },
    "averaging": {
        "per_image": "mean over pairs of each pair's fraction of correct keypoints",
        "per_keypoint": "correct keypoints / all keypoints, pooled over pairs",
    },
    "distance": "Euclidean, in the target image's original pixels",
}

_TABLE_LABELS = {
    "le": "distance <= alpha * side (DIFT)", "lt": "distance < alpha * side (CleanDIFT code)",
    "bbox": "side: target bbox", "img": "side: target image (orig. px)",
    "per_image": "per image", "per_keypoint": "per keypoint",
}


@dataclass
class PairDistances:
    """One pair's keypoint errors and the sides its thresholds scale with."""

    distances: list[float]  # predicted to true target keypoint, in original pixels
    sides: dict[str, float]  # threshold reference -> side


def pair_distances(pred: Iterable[tuple[float, float]], truth: list[list[float]],
                   bbox: list[float], image_size: tuple[int, int]) -> PairDistances:
    """Errors of the predicted target keypoints; `bbox` is x1, y1, x2, y2 and `image_size`
    (W, H) is the target's original size, both in its original pixels."""
    distances = [((px - tx) ** 2 + (py - ty) ** 2) ** 0.5
                 for (px, py), (tx, ty) in zip(pred, truth)]
    sides = {"bbox": float(max(bbox[2] - bbox[0], bbox[3] - bbox[1])),
             "img": float(max(image_size))}
    return PairDistances(distances, sides)


def correct(pair: PairDistances, comparison: str, threshold: str, alpha: float) -> list[bool]:
    """Per keypoint of the pair: correct under this comparison and threshold."""
    within = COMPARISONS[comparison]
    limit = alpha * pair.sides[threshold]
    return [within(d, limit) for d in pair.distances]


class Tally:
    """Pairs' distances kept whole, so every axis is computed from the same matches."""

    def __init__(self) -> None:
        self.pairs: list[PairDistances] = []

    def add(self, pair: PairDistances) -> None:
        if pair.distances:  # a pair without keypoints has no PCK of its own
            self.pairs.append(pair)

    def pck(self, comparison: str, threshold: str, averaging: str, alpha: float) -> float | None:
        """PCK in percent (rounded to 0.01), None without pairs."""
        hits = [correct(p, comparison, threshold, alpha) for p in self.pairs]
        if not hits:
            return None
        if averaging == "per_image":
            value = sum(sum(h) / len(h) for h in hits) / len(hits)
        elif averaging == "per_keypoint":
            value = sum(sum(h) for h in hits) / sum(len(h) for h in hits)
        else:
            raise ValueError(f"averaging must be one of {AVERAGINGS}, not {averaging!r}")
        return round(100.0 * value, 2)

    def report(self) -> dict[str, Any]:
        pck = {c: {t: {a: {f"{alpha:.2f}": self.pck(c, t, a, alpha) for alpha in ALPHAS}
                       for a in AVERAGINGS} for t in THRESHOLDS} for c in COMPARISONS}
        return {"pairs": len(self.pairs),
                "keypoints": sum(len(p.distances) for p in self.pairs), "pck": pck}


def format_table(summary: dict[str, Any]) -> str:
    """The `pck` of one report (overall or a category) as a plain-text table: one block per
    comparison, one row per alpha, one column per threshold and averaging."""
    columns = [(t, a) for t in THRESHOLDS for a in AVERAGINGS]
    width = 15
    heads = ["".join(_TABLE_LABELS[t].ljust(2 * width) for t in THRESHOLDS),
             "".join(_TABLE_LABELS[a].ljust(width) for _, a in columns)]
    lines = [" " * 8 + heads[0].rstrip(), "  alpha " + heads[1].rstrip()]
    for comparison, by_threshold in summary["pck"].items():
        lines.append(_TABLE_LABELS[comparison])
        for alpha in (f"{a:.2f}" for a in ALPHAS):
            cells = [by_threshold[t][a][alpha] for t, a in columns]
            lines.append(f"  {alpha:<6}" + "".join(
                ("-" if v is None else f"{v:6.2f}").ljust(width) for v in cells).rstrip())
    return "\n".join(lines)
