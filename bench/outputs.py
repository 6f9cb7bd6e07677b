"""What the reduced outputs and the feature cache buy, on the real stack and model.

Outputs: bytes per answer and images/s of us6 as the full map (float16), at 100 points,
pooled to a 16x16 grid, and as int8 with per-channel scales, at 768 px (SD2.1's geometry:
us6 is 48x48), one after the other on one stack with the cache off.
Cache: requests/s of an image sent again (answered from the worker's memory) beside new
images (each a forward pass), on one stack with the cache on.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from dataclasses import dataclass, field

import httpx

from .load import FeaturesRequest, features_request, run_load
from .stack import service_stack

SIDE = 768
VARIANTS: dict[str, tuple[dict[str, str], dict[str, str]]] = {  # form fields, query
    "full": ({}, {}),
    "points100": ({"points": "100"}, {}),  # 100 points spread over the image (see below)
    "grid16": ({"grid": "16"}, {}),
    "int8": ({}, {"dtype": "int8"}),
}
OUTPUT_DESCRIPTIONS = {
    **{f"outputs_{v}_bytes": f"us6 at {SIDE} px, {v}: bytes per safetensors answer"
       for v in VARIANTS},
    **{f"outputs_{v}_images_per_s": f"us6 at {SIDE} px, {v}: images/s, 8 clients"
       for v in VARIANTS},
    **{f"outputs_full_vs_{v}_bytes": f"answer size, full map / {v}" for v in VARIANTS
       if v != "full"},
    "cache_hit_requests_per_s": "an image sent again (memory tier), 16 clients: requests/s",
    "cache_miss_requests_per_s": "a new image every request, 16 clients: requests/s",
    "cache_hit_vs_miss": "requests/s, cache hit / miss",
}


@dataclass
class NewImages:
    """POST /features with a different image each time (a cache miss every request)."""

    images: list[bytes]
    _next: itertools.count = field(default_factory=itertools.count)

    def __call__(self, client: httpx.AsyncClient):
        image = self.images[next(self._next) % len(self.images)]
        return client.post("/features", files={"image": ("image.jpg", image)},
                           data={"layers": "us6"}, params={"format": "safetensors"})


def _request(image: bytes, fields: dict[str, str], query: dict[str, str], side: int
             ) -> FeaturesRequest:
    if "points" in fields:
        fields = {**fields, "points": _spread(image, int(fields["points"]))}
    return features_request(image, {"format": "safetensors", **query}, layers="us6",
                            size=str(side), **fields)


def _spread(image: bytes, n: int) -> str:
    """`n` points in pixels of `image`, spread over it (a keypoint detector's output)."""
    from PIL import Image

    width, height = Image.open(io.BytesIO(image)).size
    golden = 0.6180339887
    return json.dumps([[round((i * golden) % 1 * (width - 1), 1),
                        round((i + 0.5) / n * (height - 1), 1)] for i in range(n)])


def _answer_bytes(url: str, request: FeaturesRequest) -> int:
    with httpx.Client(base_url=url, timeout=120) as client:
        response = client.post("/features", files={"image": ("image.jpg", request.image)},
                               data=dict(request.fields), params=dict(request.params))
    response.raise_for_status()
    return len(response.content)


def output_figures(model: str, image: bytes, total: int, side: int = SIDE
                   ) -> dict[str, float]:
    figures: dict[str, float] = {}
    with service_stack(model, workers=os.cpu_count() or 1, torch_threads="1",
                       max_batch="4") as stack:
        for name, (fields, query) in VARIANTS.items():
            request = _request(image, fields, query, side)
            figures[f"outputs_{name}_bytes"] = _answer_bytes(stack.url, request)
            run_load(stack.url, request, concurrency=8, total=8)  # warm-up
            load = run_load(stack.url, request, concurrency=8, total=total)
            if load.ok != total:
                raise RuntimeError(f"{name}: statuses {set(load.statuses)} {load.errors[:2]}")
            figures[f"outputs_{name}_images_per_s"] = load.throughput()
    for name in VARIANTS:
        if name != "full":
            figures[f"outputs_full_vs_{name}_bytes"] = (figures["outputs_full_bytes"]
                                                         / figures[f"outputs_{name}_bytes"])
    return figures


def cache_figures(model: str, images: list[bytes], hits: int) -> dict[str, float]:
    """`images` must all differ; the first is the repeated one."""
    with service_stack(model, workers=os.cpu_count() or 1, torch_threads="1", max_batch="4",
                       feature_cache_bytes=str(256 << 20)) as stack:
        repeated = features_request(images[0], {"format": "safetensors"}, layers="us6")
        run_load(stack.url, repeated, concurrency=16, total=16)  # computed once, then cached
        miss = run_load(stack.url, NewImages(images[1:]), concurrency=16, total=len(images) - 1)
        hit = run_load(stack.url, repeated, concurrency=16, total=hits)
    if miss.ok != len(images) - 1 or hit.ok != hits:
        raise RuntimeError(f"cache: statuses {set(miss.statuses) | set(hit.statuses)}")
    return {"cache_miss_requests_per_s": miss.throughput(),
            "cache_hit_requests_per_s": hit.throughput(),
            "cache_hit_vs_miss": hit.throughput() / miss.throughput()}
