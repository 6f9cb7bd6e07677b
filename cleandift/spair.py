"""SPair-71k evaluation with the DIFT protocol: PCK at 0.05 / 0.10 / 0.15, per keypoint and
per image, against the target bounding box and the target image size.

Both modes get the same prompt policy (the category caption "a photo of a {category}" by
default, as DIFT uses and CleanDIFT's notebook does; "" for none), so a comparison
between them is fair. DIFT mode draws its noise per image from a seed derived from the
image's bytes: fresh noise for every image (shared noise between source and target would
be a common component that biases matches) and still reproducible run to run.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from .extractor import Extractor
from .images import to_rgb
from .matching import match_points
from .method import DIFT_PROMPT

ALPHAS = (0.05, 0.10, 0.15)
# PCK's comparison: DIFT counts a keypoint within alpha * side as correct (`<=`); the
# GeoAware-SC protocol, which some reported numbers follow, uses `<`.
PCK_RULES: dict[str, Callable[[float, float], bool]] = {
    "le": lambda d, limit: d <= limit, "lt": lambda d, limit: d < limit}


@dataclass(frozen=True)
class Pair:
    category: str
    source: Path
    target: Path
    source_kps: list[list[float]]
    target_kps: list[list[float]]
    target_bbox: list[float]  # x1, y1, x2, y2


def load_pairs(root: Path, *, split: str = "test", category: str | None = None,
               limit: int | None = None) -> list[Pair]:
    """PairAnnotation/<split>/*.json as distributed, images from JPEGImages/<category>/."""
    files = sorted((Path(root) / "PairAnnotation" / split).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no pair annotations under {root}/PairAnnotation/{split}")
    pairs = []
    for path in files:
        ann = json.loads(path.read_text())
        if category and ann["category"] != category:
            continue
        images = Path(root) / "JPEGImages" / ann["category"]
        pairs.append(Pair(ann["category"], images / ann["src_imname"], images / ann["trg_imname"],
                          ann["src_kps"], ann["trg_kps"], ann["trg_bndbox"]))
        if limit and len(pairs) >= limit:
            break
    return pairs


def pck_hits(pred: Iterable[tuple[float, float]], truth: list[list[float]],
             bbox: list[float], image_size: tuple[int, int],
             rule: str = "le") -> dict[str, dict[float, list[bool]]]:
    """Per keypoint: within alpha * max(h, w) of the target bbox, and of the target image."""
    within = PCK_RULES[rule]
    bbox_side = max(bbox[2] - bbox[0], bbox[3] - bbox[1])
    img_side = max(image_size)
    out: dict[str, dict[float, list[bool]]] = {"bbox": defaultdict(list), "img": defaultdict(list)}
    for (px, py), (tx, ty) in zip(pred, truth):
        dist = ((px - tx) ** 2 + (py - ty) ** 2) ** 0.5
        for alpha in ALPHAS:
            out["bbox"][alpha].append(within(dist, alpha * bbox_side))
            out["img"][alpha].append(within(dist, alpha * img_side))
    return out


def image_seed(data: bytes, base: int = 0) -> int:
    """DIFT noise seed of one image: its bytes and the run's base seed."""
    digest = hashlib.sha256(base.to_bytes(8, "little", signed=True) + data).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


class Tally:
    """PCK accumulated per keypoint (pooled) and per image (mean of pair means)."""

    def __init__(self) -> None:
        self.kp: dict[tuple[str, float], list[bool]] = defaultdict(list)
        self.img: dict[tuple[str, float], list[float]] = defaultdict(list)

    def add(self, hits: dict[str, dict[float, list[bool]]]) -> None:
        for kind, by_alpha in hits.items():
            for alpha, values in by_alpha.items():
                if values:
                    self.kp[kind, alpha].extend(values)
                    self.img[kind, alpha].append(sum(values) / len(values))

    def report(self) -> dict[str, Any]:
        def pct(values: list[bool] | list[float]) -> float | None:
            return round(100.0 * sum(values) / len(values), 2) if values else None

        report: dict[str, Any] = {
            f"pck_{kind}": {
                f"{alpha:.2f}": {"per_keypoint": pct(self.kp[kind, alpha]),
                                 "per_image": pct(self.img[kind, alpha])}
                for alpha in ALPHAS
            }
            for kind in ("bbox", "img")
        }
        report["keypoints"] = len(self.kp["bbox", ALPHAS[0]])
        report["pairs"] = len(self.img["bbox", ALPHAS[0]])
        return report


def evaluate(extractor: Extractor, pairs: list[Pair], *, mode: str = "clean",
             layer: str | None = None, size: int | None = None,
             prompt: str = DIFT_PROMPT, pck: str = "le", seed: int = 0) -> dict[str, Any]:
    """Features of each image once per category (cached), matched per the DIFT protocol.
    `prompt` is a template ('{category}' filled in), the same for both modes."""
    if pck not in PCK_RULES:
        raise ValueError(f"pck must be one of {sorted(PCK_RULES)}, not {pck!r}")
    layer = layer or extractor.info.correspondence_layer
    template = prompt
    overall: Tally = Tally()
    per_category: dict[str, Tally] = defaultdict(Tally)
    cache: dict[Path, tuple[torch.Tensor, tuple[int, int]]] = {}
    current = None
    for pair in tqdm(pairs, desc="spair", unit="pair"):
        if pair.category != current:
            cache.clear()  # features are kept for one category at a time
            current = pair.category
        text = template.format(category=pair.category)
        src, src_size = _features(extractor, pair.source, cache, layer, size, mode, text, seed)
        tgt, tgt_size = _features(extractor, pair.target, cache, layer, size, mode, text, seed)
        matches = match_points(src, tgt, pair.source_kps, src_size, tgt_size)
        hits = pck_hits([m.target for m in matches], pair.target_kps, pair.target_bbox, tgt_size,
                        pck)
        overall.add(hits)
        per_category[pair.category].add(hits)
    return {
        "model": extractor.info.name, "model_version": extractor.info.version, "mode": mode,
        "layer": layer, "size": size or extractor.info.input_size, "prompt": template,
        "pck": "<=" if pck == "le" else "<", "dtype": str(extractor.dtype).removeprefix("torch."),
        "noise": "per image (seed from its bytes)" if mode == "dift" else None,
        "seed": seed if mode == "dift" else None,
        "overall": overall.report(),
        "per_category": {c: t.report() for c, t in sorted(per_category.items())},
    }


def _features(extractor: Extractor, path: Path,
              cache: dict[Path, tuple[torch.Tensor, tuple[int, int]]], layer: str,
              size: int | None, mode: str, prompt: str,
              seed: int) -> tuple[torch.Tensor, tuple[int, int]]:
    if path not in cache:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            rgb = to_rgb(image.convert("RGB") if image.mode == "P" else image)
            pixels = extractor.preprocess([rgb], size)
            seeds = [image_seed(data, seed)] if mode == "dift" else None
            feats = extractor.features(pixels, [layer], prompt, mode=mode, seeds=seeds)
            cache[path] = (feats[layer][0].float(), rgb.size)
    return cache[path]
