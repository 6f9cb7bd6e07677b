"""A self-supervised correspondence score: PCK under known geometric warps.

SPair-71k needs a labelled dataset and measures *semantic* correspondence across
instances. To gate a new model version we want a number any image folder gives: warp
each image by a known transform (a homography, a crop with a rescale, a horizontal flip),
match a fixed grid of source points into the warped copy with the served matcher
(`match_points`), and count a match correct when it lies within alpha * max(width,
height) of the *warped* image from where the warp sent the point (distance <= threshold,
DIFT's rule). The ground truth is exact, so the score is too; it is a proxy for geometric
correspondence quality on these images, not a replacement for SPair.

Deterministic: each image's warps are drawn from a seed and the image's own bytes, the
points are a fixed grid, and points the warp sends outside the target are skipped.
Coordinates are pixels with [0, 0] the centre of the top-left pixel, as in the API.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .datasets.sources import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    Record,
    load_records,
    read_image_bytes,
)
from .images import ImageError, decode_image
from .matching import match_points

if TYPE_CHECKING:
    from .extractor import Extractor

PROTOCOL = "warps-v1"  # bump when anything below changes what the score means
KINDS = ("homography", "crop", "flip")
ALPHAS = (0.05, 0.10)
GATE_ALPHA = "pck@0.10"  # the figure the publishing gate compares
GRID = 8  # GRID x GRID source points per image
MAX_SIDE = 512  # images are first reduced to this longest side (warping big photos is slow)
MIN_SIDE = 32  # smaller images are skipped: their warps would be a few pixels wide
# A homography: a rotation, scale and shift about the centre, then each corner moved a
# little more (perspective). Strong enough that predicting "the same place" scores low.
HOMOGRAPHY_ROTATION = 30.0  # degrees, either way
HOMOGRAPHY_SCALE = (0.8, 1.25)
HOMOGRAPHY_SHIFT = 0.1  # fraction of each side, either way
HOMOGRAPHY_JITTER = 0.1  # fraction of each side a corner moves, either way
CROP_KEEP = (0.4, 0.7)  # fraction of each side a crop keeps
CROP_RESCALE = (0.6, 1.5)  # then the crop is resized by this factor
THRESHOLD = "alpha * max(width, height) of the warped image; correct when distance <= it"
BASELINE = "predicting the same relative position in the warped image (no features)"

# images (RGB), keys -> {key: [N, C, h, w]}: whatever computes the model's features
FeatureFn = Callable[[list[Image.Image], list[str]], dict[str, torch.Tensor]]


def _translate(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


@dataclass(frozen=True, eq=False)
class Warp:
    """A known transform: `matrix` sends source pixels to target pixels (pixel centres)."""

    kind: str
    matrix: np.ndarray  # 3 x 3
    size: tuple[int, int]  # the target's (width, height)
    box: tuple[float, float, float, float] | None = None  # a crop's region, as PIL's box

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Where the warp sends source pixels [P, 2]: the exact ground truth."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        homog = np.c_[pts, np.ones(len(pts))] @ self.matrix.T
        mapped: np.ndarray = homog[:, :2] / homog[:, 2:]
        return mapped

    def apply(self, image: Image.Image) -> Image.Image:
        """The warped image, made with PIL's own operations (flip, resized crop, perspective),
        whose geometry the tests check against `map_points`."""
        if self.kind == "flip":
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.kind == "crop":
            return image.resize(self.size, Image.Resampling.BICUBIC, box=self.box)
        # PIL's perspective maps output to input in coordinates where pixel i spans [i, i+1].
        inverse = _translate(0.5, 0.5) @ np.linalg.inv(self.matrix) @ _translate(-0.5, -0.5)
        coeffs = (inverse / inverse[2, 2]).flatten()[:8]
        return image.transform(self.size, Image.Transform.PERSPECTIVE, tuple(coeffs.tolist()),
                               Image.Resampling.BICUBIC)


def fit_homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3 x 3 homography sending 4 points `src` [4, 2] to `dst` [4, 2] (h33 = 1)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(np.asarray(src, float), np.asarray(dst, float)):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    h = np.linalg.solve(np.array(rows), np.array(rhs))
    return np.append(h, 1.0).reshape(3, 3)


def image_corners(size: tuple[int, int]) -> np.ndarray:
    """The outer corners of an image of (width, height), in pixel-centre coordinates."""
    w, h = size
    return np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]])


def homography_warp(size: tuple[int, int], moved_corners: np.ndarray) -> Warp:
    """The source's corners go to `moved_corners`; the target has the source's size."""
    return Warp("homography", fit_homography(image_corners(size), moved_corners), size)


def crop_warp(box: tuple[float, float, float, float], out: tuple[int, int]) -> Warp:
    """The region `box` resized to `out` (width, height). The box is PIL's: its edges in
    coordinates where pixel i spans [i, i + 1], i.e. x + 0.5 for our pixel x."""
    left, top, right, bottom = box
    sx, sy = out[0] / (right - left), out[1] / (bottom - top)
    # x' + 0.5 = (x + 0.5 - left) * sx
    matrix = np.array([[sx, 0.0, (0.5 - left) * sx - 0.5], [0.0, sy, (0.5 - top) * sy - 0.5],
                       [0.0, 0.0, 1.0]])
    return Warp("crop", matrix, out, box)


def flip_warp(size: tuple[int, int]) -> Warp:
    """The horizontal mirror: x' = width - 1 - x."""
    return Warp("flip", np.array([[-1.0, 0.0, size[0] - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
                size)


def random_homography(size: tuple[int, int], rng: np.random.Generator) -> Warp:
    """Rotation, scale and shift about the centre, plus a perspective jitter of the corners."""
    w, h = size
    angle = np.radians(rng.uniform(-HOMOGRAPHY_ROTATION, HOMOGRAPHY_ROTATION))
    scale = rng.uniform(*HOMOGRAPHY_SCALE)
    rotate = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shift = rng.uniform(-HOMOGRAPHY_SHIFT, HOMOGRAPHY_SHIFT, 2) * [w, h]
    jitter = rng.uniform(-HOMOGRAPHY_JITTER, HOMOGRAPHY_JITTER, (4, 2)) * [w, h]
    centre = np.array([w / 2 - 0.5, h / 2 - 0.5])
    moved = centre + (image_corners(size) - centre) @ rotate.T + shift + jitter
    return homography_warp(size, moved)


def random_warps(size: tuple[int, int], rng: np.random.Generator) -> list[Warp]:
    """One warp of each kind, in KINDS order, drawn from `rng`."""
    w, h = size
    homography = random_homography(size, rng)
    keep, rescale = rng.uniform(*CROP_KEEP), rng.uniform(*CROP_RESCALE)
    bw, bh = keep * w, keep * h
    left, top = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    out = (max(MIN_SIDE // 2, round(bw * rescale)), max(MIN_SIDE // 2, round(bh * rescale)))
    return [homography, crop_warp((left, top, left + bw, top + bh), out), flip_warp(size)]


def grid_points(size: tuple[int, int], n: int = GRID) -> np.ndarray:
    """The centres of an n x n partition of the image: [n * n, 2] pixels."""
    w, h = size
    xs, ys = (np.arange(n) + 0.5) * w / n - 0.5, (np.arange(n) + 0.5) * h / n - 0.5
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def inside(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Which points [P, 2] fall on the image of (width, height)."""
    w, h = size
    return ((points[:, 0] >= -0.5) & (points[:, 0] <= w - 0.5)
            & (points[:, 1] >= -0.5) & (points[:, 1] <= h - 0.5))


@dataclass(frozen=True)
class Sample:
    """One evaluation image; its bytes' digest seeds its warps and names it in the
    fingerprint, so an image gets the same warps whatever else is in the folder."""

    key: str
    digest: str
    image: Image.Image


def read_samples(records: Sequence[Record], max_side: int = MAX_SIDE) -> tuple[list[Sample], int]:
    """(readable images reduced to `max_side`, how many were skipped as unreadable or tiny)."""
    samples, skipped = [], 0
    for record in records:
        try:
            data = read_image_bytes(record)
            image = decode_image(data, max_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_IMAGE_PIXELS)
        except (ImageError, OSError, KeyError, tarfile.TarError):
            skipped += 1
            continue
        scale = max_side / max(image.size)
        if scale < 1:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
        if min(image.size) < MIN_SIDE:
            skipped += 1
            continue
        samples.append(Sample(record.key, hashlib.sha256(data).hexdigest(), image))
    return samples, skipped


def load_samples(source: str, max_side: int = MAX_SIDE) -> tuple[list[Sample], int]:
    """A folder, list file or shards (as `cleandift.datasets.sources` reads them) -> samples."""
    return read_samples(load_records(source), max_side)


def extractor_features(extractor: Extractor, size: int | None = None) -> FeatureFn:
    """The served model's clean features at its input size (or `size`)."""

    def features(images: list[Image.Image], keys: list[str]) -> dict[str, torch.Tensor]:
        return extractor.features(extractor.preprocess(images, size), keys)

    return features


class _Tally:
    """Normalised errors (distance / threshold side) per (layer, kind), skipped per kind."""

    def __init__(self) -> None:
        self.errors: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.skipped: dict[str, int] = defaultdict(int)
        self.inexact = 0

    def add(self, layer: str, kind: str, pred: np.ndarray, truth: np.ndarray, side: int) -> None:
        self.errors[layer, kind].extend((np.linalg.norm(pred - truth, axis=1) / side).tolist())

    def pck(self, layer: str, kinds: Sequence[str]) -> dict[str, float | None]:
        errors = [e for kind in kinds for e in self.errors[layer, kind]]
        return {f"pck@{a:.2f}": round(sum(e <= a for e in errors) / len(errors), 4)
                if errors else None for a in ALPHAS}

    def report(self, layers: Sequence[str]) -> dict[str, Any]:
        return {layer: {**self.pck(layer, KINDS), "points": sum(
            len(self.errors[layer, k]) for k in KINDS),
            "per_kind": {kind: self.pck(layer, [kind]) for kind in KINDS}} for layer in layers}


def evaluate(features: FeatureFn, samples: Sequence[Sample], layers: Sequence[str], *,
             layer: str, seed: int = 0, grid: int = GRID, progress: bool = True,
             conditions: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """PCK per layer (and per warp kind) over every sample's warps. `layer` is the one the
    publishing gate compares (the correspondence layer); it is always evaluated.
    `conditions` (input size, precision) are what else changes a score: they are reported
    and fingerprinted, so scores measured at another size or precision never compare."""
    keys = list(dict.fromkeys([*layers, layer]))
    tally = _Tally()
    # (no tqdm object at all without progress: it would start its monitor thread)
    for sample in tqdm(samples, desc="warps", unit="image") if progress else samples:
        rng = np.random.default_rng([seed, int(sample.digest[:15], 16)])
        warps = random_warps(sample.image.size, rng)
        feats = features([sample.image, *(w.apply(sample.image) for w in warps)], keys)
        points = grid_points(sample.image.size, grid)
        for i, warp in enumerate(warps, start=1):
            truth = warp.map_points(points)
            keep = inside(truth, warp.size)
            tally.skipped[warp.kind] += int((~keep).sum())
            if not keep.any():
                continue
            same = (points[keep] + 0.5) * np.divide(warp.size, sample.image.size) - 0.5
            tally.add(BASELINE, warp.kind, same, truth[keep], max(warp.size))
            for key in keys:
                matches = match_points(feats[key][0].float(), feats[key][i].float(),
                                       torch.from_numpy(points[keep]).float(),
                                       sample.image.size, warp.size)
                pred = np.array([m.target for m in matches], dtype=np.float64)
                # (a match a cost limit stopped early is not DIFT's argmax: counted, reported)
                tally.inexact += sum(not getattr(m, "exact", True) for m in matches)
                tally.add(key, warp.kind, pred, truth[keep], max(warp.size))
    return {
        "protocol": PROTOCOL, "layer": layer, "threshold": THRESHOLD, "seed": seed,
        "grid": grid, "kinds": list(KINDS), "images": len(samples),
        "skipped_points": dict(tally.skipped), "inexact_matches": tally.inexact,
        "conditions": dict(conditions or {}),
        "fingerprint": fingerprint(samples, seed=seed, grid=grid, conditions=conditions),
        "layers": tally.report(keys),
        "baseline": {"what": BASELINE, **tally.report([BASELINE])[BASELINE]},
    }


def fingerprint(samples: Sequence[Sample], *, seed: int, grid: int,
                conditions: Mapping[str, Any] | None = None) -> str:
    """Names the images (their bytes and evaluated size), protocol and conditions a score
    was measured under: two scores compare only when their fingerprints are equal."""
    spec = {"protocol": PROTOCOL, "seed": seed, "grid": grid,
            "conditions": dict(conditions or {}),
            "images": sorted((s.digest, *s.image.size) for s in samples)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def gate_score(report: dict[str, Any] | None) -> float | None:
    """PCK@0.10 of the report's gate layer, or None when there is none to compare."""
    if not report:
        return None
    value = report.get("layers", {}).get(report.get("layer"), {}).get(GATE_ALPHA)
    return float(value) if value is not None else None
