"""SPair-71k evaluation with DIFT's matching: PCK at 0.05 / 0.10 / 0.15 along every axis
of its protocol (cleandift.pck: `<=` or `<`, target bbox or target image, per image or per
keypoint), so each number can stand beside a paper's.

Both modes get the same prompt policy (the category caption "a photo of a {category}" by
default, as DIFT uses and CleanDIFT's notebook does; "" for none), so a comparison
between them is fair. DIFT mode draws its noise per image from a seed derived from the
image's bytes: fresh noise for every image (shared noise between source and target would
be a common component that biases matches) and still reproducible run to run.

A PCK is only DIFT's if every match is the exact argmax: matches that a deadline or cost
limit stopped early (`Match.exact` False) are counted, and the evaluation refuses to
report unless approximate matches are allowed, and then says so in the report.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from .contract import UsageError
from .extractor import Extractor
from .images import to_rgb
from .matching import match_points
from .method import DIFT_PROMPT
from .pck import PROTOCOL, Tally, format_table, pair_distances


class ApproximateMatches(UsageError):
    """Some matches were not the exact argmax, and approximate PCK was not allowed."""

    def __init__(self, inexact: int, total: int) -> None:
        super().__init__(
            f"{inexact} of {total} matches are approximate (stopped early by a deadline or "
            "cost limit); no PCK reported: pass --allow-approximate to report it labelled "
            "approximate")
        self.inexact, self.total = inexact, total


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


def image_seed(data: bytes, base: int = 0) -> int:
    """DIFT noise seed of one image: its bytes and the run's base seed."""
    digest = hashlib.sha256(base.to_bytes(8, "little", signed=True) + data).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def evaluate(extractor: Extractor, pairs: list[Pair], *, mode: str = "clean",
             layer: str | None = None, size: int | None = None,
             prompt: str = DIFT_PROMPT, seed: int = 0,
             allow_approximate: bool = False) -> dict[str, Any]:
    """Features of each image once per category (cached), matched per the DIFT protocol,
    PCK along every axis. `prompt` is a template ('{category}' filled in), the same for
    both modes. Raises ApproximateMatches when a match was not exact, unless allowed."""
    layer = layer or extractor.info.correspondence_layer
    overall: Tally = Tally()
    per_category: dict[str, Tally] = defaultdict(Tally)
    cache: dict[Path, tuple[torch.Tensor, tuple[int, int]]] = {}
    current, total, inexact = None, 0, 0
    for pair in tqdm(pairs, desc="spair", unit="pair"):
        if pair.category != current:
            cache.clear()  # features are kept for one category at a time
            current = pair.category
        text = prompt.format(category=pair.category)
        src, src_size = _features(extractor, pair.source, cache, layer, size, mode, text, seed)
        tgt, tgt_size = _features(extractor, pair.target, cache, layer, size, mode, text, seed)
        matches = match_points(src, tgt, pair.source_kps, src_size, tgt_size)
        total += len(matches)
        inexact += sum(not m.exact for m in matches)
        distances = pair_distances([m.target for m in matches], pair.target_kps,
                                   pair.target_bbox, tgt_size)
        overall.add(distances)
        per_category[pair.category].add(distances)
    if inexact and not allow_approximate:
        raise ApproximateMatches(inexact, total)
    return {
        "model": extractor.info.name, "model_version": extractor.info.version, "mode": mode,
        "layer": layer, "size": size or extractor.info.input_size, "prompt": prompt,
        "dtype": str(extractor.dtype).removeprefix("torch."),
        "noise": "per image (seed from its bytes)" if mode == "dift" else None,
        "seed": seed if mode == "dift" else None,
        "matches": {"total": total, "inexact": inexact}, "approximate": inexact > 0,
        "protocol": PROTOCOL,
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


def format_report(report: dict[str, Any]) -> str:
    """The overall PCK of a report as a labelled plain-text table (the JSON has it all)."""
    overall, matches = report["overall"], report["matches"]
    label = (f"APPROXIMATE: {matches['inexact']} of {matches['total']} matches were stopped "
             "early, these PCK are not DIFT's" if report["approximate"]
             else f"all {matches['total']} matches exact")
    lines = [
        f"SPair-71k PCK (%) of {report['model']} {report['model_version']}: mode "
        f"{report['mode']}, layer {report['layer']}, size {report['size']}, "
        f"dtype {report['dtype']}, prompt {report['prompt']!r}",
        f"{overall['pairs']} pairs, {overall['keypoints']} keypoints; {label}",
        format_table(overall),
    ]
    return "\n".join(lines)
