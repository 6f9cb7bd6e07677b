"""How often `match_points` answers DIFT's pixel, per kind of feature map: this checkout's
search beside the one of an earlier commit (`--before`, by default the last one before
matching was made exact: a 16-patch cap and a float32 bound), read from git. The
reference is a brute force written here, apart from cleandift/refine.py: upsample
(bilinear, align_corners=False), normalise, dot, argmax (float64).

    python -m cleandift.bench.agreement [--points 200] [--before d5ffa1b] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cleandift.matching import match_points

TIE = 1e-12  # float64 cosines this close are the same value
SOURCE, TARGET = (256, 256), (700, 500)  # source and target image sizes (w, h)
GRID, CHANNELS = 16, 64


def brute_force(src: torch.Tensor, tgt: torch.Tensor, points: list[list[float]]
                ) -> torch.Tensor:
    """DIFT's cosine maps of the source pixels over the target, float64, [points, H*W]."""
    up_src = F.interpolate(src[None].double(), size=SOURCE[::-1], mode="bilinear",
                           align_corners=False)[0]
    up_tgt = F.interpolate(tgt[None].double(), size=TARGET[::-1], mode="bilinear",
                           align_corners=False)[0]
    queries = torch.stack([F.normalize(up_src[:, int(y), int(x)], dim=0) for x, y in points])
    return queries @ F.normalize(up_tgt.flatten(1), dim=0)


def matcher_at(rev: str) -> Callable[..., list]:
    """`match_points` as commit `rev` had it (its matching, refine and contract modules)."""
    root = Path(tempfile.mkdtemp(prefix="agreement-"))
    package = root / "cleandift_before"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("matching", "refine", "contract", "method"):
        text = subprocess.run(["git", "show", f"{rev}:cleandift/{name}.py"], check=True,
                              capture_output=True, text=True).stdout
        (package / f"{name}.py").write_text(text)
    sys.path.insert(0, str(root))
    return importlib.import_module("cleandift_before.matching").match_points


def smooth(k: int) -> Callable[[torch.Generator], torch.Tensor]:
    def make(gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(CHANNELS, GRID, GRID, generator=gen)
        padded = F.pad(noise[None], (k // 2,) * 4, mode="replicate")
        return F.avg_pool2d(padded, k, stride=1)[0]

    return make


def low_rank(gen: torch.Generator) -> torch.Tensor:
    basis = torch.randn(CHANNELS, 3, generator=gen)
    return torch.einsum("cr,rhw->chw", basis, smooth(5)(gen)[:3]) + 1e-4 * torch.randn(
        CHANNELS, GRID, GRID, generator=gen)


def demo_us6() -> tuple[torch.Tensor, torch.Tensor]:
    """The demo model's us6 maps of two synthetic photos (its correspondence layer)."""
    from cleandift.demo import ensure_model
    from cleandift.loading import load_extractor
    from cleandift.settings import default_cache_dir
    from cleandift.trainer.synthetic import synthetic_image

    extractor = load_extractor(ensure_model("demo", default_cache_dir()), device="cpu")
    rng = np.random.default_rng(0)
    images = [synthetic_image(256, rng)[0] for _ in range(2)]
    feats = extractor.features(extractor.preprocess(images, 256), ["us6"])["us6"].float()
    return feats[0], feats[1]


KINDS: dict[str, Callable[[torch.Generator], torch.Tensor]] = {
    "random": lambda gen: torch.randn(CHANNELS, GRID, GRID, generator=gen),
    "smooth k=3": smooth(3), "smooth k=7": smooth(7), "smooth k=9": smooth(9),
    "low-rank": low_rank,
}


def agreement(src: torch.Tensor, tgt: torch.Tensor, points: list[list[float]],
              before: Callable[..., list]) -> dict[str, float]:
    """Share of points whose answer is DIFT's pixel (or ties it), now and before."""
    cos = brute_force(src, tgt, points)
    best = cos.max(dim=1).values
    row = {}
    for name, match in (("now", match_points), ("before", before)):
        flat = torch.tensor([int(m.target[1]) * TARGET[0] + int(m.target[0])
                             for m in match(src, tgt, points, SOURCE, TARGET)])
        chosen = cos.gather(1, flat[:, None])[:, 0]
        row[name] = round(float((chosen >= best - TIE).double().mean()), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--before", default="d5ffa1b", help="the earlier commit")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    before = matcher_at(args.before)
    gen = torch.Generator().manual_seed(0)
    xs = torch.stack([torch.randint(0, side, (args.points,), generator=gen)
                      for side in SOURCE], 1).float().tolist()  # (x, y) pixels of the source
    rows = {}
    for kind, make in KINDS.items():
        rows[kind] = agreement(make(gen), make(gen), xs, before)
    rows["demo us6"] = agreement(*demo_us6(), xs, before)
    for kind, row in rows.items():
        print(f"{kind:12s} DIFT's pixel: now {row['now']:.1%}, at {args.before} "
              f"{row['before']:.1%}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
