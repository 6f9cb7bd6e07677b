"""`cleandift bench`: the extractor, the service and the trainer measured side by side."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from pathlib import Path

from cleandift.loading import load_extractor
from cleandift.settings import Settings

from . import measure
from .datasets import DATASET_DESCRIPTIONS, dataset_figures
from .fleet import FLEET_DESCRIPTIONS, fleet_figures
from .load import features_request, run_load
from .outputs import OUTPUT_DESCRIPTIONS, cache_figures, output_figures
from .queue import QUEUE_DESCRIPTIONS, photo_jpeg, queue_figures
from .stack import service_stack
from .transport import TRANSPORT_DESCRIPTIONS, bench_jpeg, transport_figures

log = logging.getLogger(__name__)

# What each reported key means (printed with the table and used by the README).
DESCRIPTIONS = {
    "raw_images_per_s": "extractor alone, best batch size (images/s)",
    "service_images_per_s_c1": "HTTP + Redis + worker, 1 client (images/s)",
    "service_images_per_s_c16": "HTTP + Redis + worker, 16 clients (images/s)",
    "service_vs_raw": "service at 16 clients / extractor alone",
    "latency_ms_p50_c1": "median latency, 1 client (ms)",
    "latency_ms_p95_c16": "95th percentile latency, 16 clients (ms)",
    "clean_vs_dift8": "speed-up of one clean pass over our DIFT 8-sample ensemble",
    "clean_vs_dift8_flops": "the same as a FLOP ratio",
    "clean_vs_dift8_reference_flops": "FLOP ratio against DIFT's own recipe (8 encodes + 8 UNet)",
    "truncated_vs_full_us6": "UNet speed-up reading us6 with the early stop vs a full pass",
    "truncated_vs_full_us6_flops": "the same as a FLOP ratio",
    "json_vs_safetensors_bytes": "response size, 11 layers, JSON / safetensors",
    "json_vs_safetensors_encode": "encode + decode time, JSON / safetensors",
    "train_once_vs_thrice": "trainer step speed-up, student once vs three times",
    "train_once_vs_thrice_flops": "the same as a FLOP ratio",
    **TRANSPORT_DESCRIPTIONS,
    **OUTPUT_DESCRIPTIONS,
    **FLEET_DESCRIPTIONS,
    **QUEUE_DESCRIPTIONS,
    **DATASET_DESCRIPTIONS,
}


def bench_images(n: int, size: tuple[int, int] = (320, 240)):
    import numpy as np

    from cleandift.trainer.synthetic import synthetic_image  # photo-like content, no dataset needed

    rng = np.random.default_rng(0)
    return [synthetic_image(max(size), rng)[0].resize(size) for _ in range(n)]


def service_figures(model: str, jpeg: bytes, quick: bool, batch: int) -> dict[str, float]:
    """The real stack as deployed on a CPU box: one single-threaded worker per core, the
    batch limit at the extractor's best batch size."""
    n1, n16 = (12, 64) if quick else (30, 192)
    workers = os.cpu_count() or 1
    with service_stack(model, workers=workers, torch_threads="1", max_batch=str(batch)) as stack:
        request = features_request(jpeg)
        run_load(stack.url, request, concurrency=16, total=32)  # warm-up
        c1 = run_load(stack.url, request, concurrency=1, total=n1)
        c16 = run_load(stack.url, request, concurrency=16, total=n16)
    if c1.ok != n1 or c16.ok != n16:
        raise RuntimeError(f"service errors: c1 {c1.statuses}, c16 {set(c16.statuses)}")
    return {
        "service_images_per_s_c1": c1.throughput(),
        "service_images_per_s_c16": c16.throughput(),
        "latency_ms_p50_c1": c1.percentile_ms(50),
        "latency_ms_p95_c16": c16.percentile_ms(95),
    }


PARTS = ("model", "service", "transport", "outputs", "fleet", "queue", "datasets")


def run_bench(model: str | None, quick: bool, parts: tuple[str, ...] = PARTS
              ) -> dict[str, float]:
    """The figures of the chosen parts, measured one after the other in this run."""
    from cleandift.demo import ensure_model

    settings = Settings()
    model = model or str(ensure_model("bench", settings.cache_dir))
    figures: dict[str, float] = {}
    if "model" in parts or "service" in parts:
        figures.update(model_figures(model, quick, settings, with_model="model" in parts,
                                     with_service="service" in parts))
    if "transport" in parts:
        for path in ("redis", "direct"):  # before and after: the result path alone differs
            start = time.perf_counter()
            figures.update(transport_figures(path, quick, bench_jpeg(768, 768)))
            log.info("transport through %s measured in %.1fs", path, time.perf_counter() - start)
        figures.update(camera_figures(quick))
    if "outputs" in parts:
        figures.update(output_figures(model, bench_jpeg(640, 480), 16 if quick else 48))
        new_images = [_jpeg(image) for image in bench_images(49 if quick else 97)]
        figures.update(cache_figures(model, new_images, 200 if quick else 600))
    if "fleet" in parts:
        figures.update(fleet_figures(bench_jpeg(320, 240), quick))
    if "queue" in parts:
        figures.update(queue_figures(photo_jpeg(), quick))
    if "datasets" in parts:
        figures.update(dataset_figures(quick))
    return {key: round(float(value), 4) for key, value in figures.items()}


def model_figures(model: str, quick: bool, settings: Settings, *, with_model: bool,
                  with_service: bool) -> dict[str, float]:
    repeats = 3 if quick else 7
    ex = load_extractor(model, device="cpu", cache_dir=settings.cache_dir)
    images = bench_images(16)
    raw = measure.raw_throughput(ex, images, [1, 2, 4, 8] if quick else [1, 2, 4, 8, 16], repeats)
    best_batch = max(raw, key=lambda b: raw[b])
    steps = [
        ("clean vs DIFT", lambda: measure.clean_vs_dift(ex, images, repeats)),
        ("truncation", lambda: measure.truncation(ex, images, 4, repeats)),
        ("response formats", lambda: measure.response_formats(ex, images[0], repeats)),
        ("trainer step", lambda: measure.train_once_vs_thrice(ex, images, 4 if quick else 8,
                                                               max(2, repeats - 1))),
    ] if with_model else []
    if with_service:
        steps.append(("service", lambda: service_figures(model, _jpeg(images[0]), quick,
                                                         best_batch)))
    figures: dict[str, float] = {"raw_images_per_s": raw[best_batch]}
    log.info("raw extractor: %s images/s by batch size",
             {b: round(v, 2) for b, v in raw.items()})
    for name, step in steps:
        start = time.perf_counter()
        figures.update(step())
        log.info("%s measured in %.1fs", name, time.perf_counter() - start)
    if with_service:
        figures["service_vs_raw"] = (figures["service_images_per_s_c16"]
                                     / figures["raw_images_per_s"])
    return figures


def camera_figures(quick: bool) -> dict[str, float]:
    """The direct path with a 640x480 photo: the API resamples it to 768 (bicubic) first."""
    figures = transport_figures("direct", quick, bench_jpeg(640, 480), sets=("us6",))
    return {key.replace("transport_direct_", "transport_camera_"): value
            for key, value in figures.items()}


def _jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def table(figures: dict[str, float]) -> str:
    width = max(map(len, figures))
    return "\n".join(f"{k:<{width}}  {v:>10.3f}  {DESCRIPTIONS.get(k, '')}"
                     for k, v in figures.items())


def write_json(figures: dict[str, float], path: Path) -> None:
    path.write_text(json.dumps(figures, indent=2) + "\n")
