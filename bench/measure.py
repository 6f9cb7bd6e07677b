"""Side-by-side measurements: each returns a measured time ratio next to its FLOP ratio,
both taken in the same process on the same model, so the figures are comparable."""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from cleandift.client.tensors import read_safetensors
from cleandift.extractor import Extractor
from cleandift.layers import unet_features
from cleandift.method import DIFT_TIMESTEP, LAYER_KEYS
from cleandift.service.api.formats import encode, inline_raw
from cleandift.service.messages import LayerMeta, ResultMeta
from cleandift.trainer.distill import Student, distill_loss

Images = list[Image.Image]


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_ratio(fast: Callable[[], object], slow: Callable[[], object], repeats: int) -> float:
    """median time of `slow` / median time of `fast`, timed alternately so that drift in
    the machine's load hits both alike."""
    fast(), slow()  # warm-up
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        for fn, times in ((fast, a), (slow, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(b) / statistics.median(a)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def raw_throughput(ex: Extractor, images: Images, batch_sizes: list[int],
                   repeats: int) -> dict[int, float]:
    """Images/s of the extractor alone (resize + forward + copy out), per batch size."""
    return {b: b / median_time(functools.partial(ex.extract, images[:b]), repeats)
            for b in batch_sizes}


def clean_vs_dift(ex: Extractor, images: Images, repeats: int) -> dict[str, float]:
    """Throughputs each at its best batch size (a DIFT image is already 8 UNet samples)."""
    clean = min(median_time(functools.partial(ex.extract, images[:b], ["us6"]), repeats) / b
                for b in (1, 2, 4))
    dift = min(median_time(functools.partial(ex.extract, images[:b], ["us6"], mode="dift",
                                             seeds=list(range(b))), repeats) / b
               for b in (1, 2))
    pixels = ex.preprocess(images[:1])
    clean_flops = count_flops(lambda: ex.features(pixels, ["us6"]))
    dift_flops = count_flops(lambda: ex.features(pixels, ["us6"], mode="dift", seeds=[0]))

    @torch.inference_mode()
    def reference():  # DIFT's own recipe: 8 VAE encodes, 8 UNet passes (to us6)
        eight = pixels.repeat(8, 1, 1, 1)
        latents = ex.vae.encode(eight).latent_dist.sample() * ex.vae.config.scaling_factor
        t = torch.full((8,), DIFT_TIMESTEP)
        unet_features(ex.unet, latents, t, ex.prompts(""), ["us6"])

    return {
        "clean_vs_dift8": dift / clean,
        "clean_vs_dift8_flops": dift_flops / clean_flops,
        "clean_vs_dift8_reference_flops": count_flops(reference) / clean_flops,
    }


def truncation(ex: Extractor, images, batch: int, repeats: int) -> dict[str, float]:
    """UNet time to read us6 with the early stop vs a full UNet pass."""
    with torch.inference_mode():
        latents = ex.vae.encode(ex.preprocess(images[:batch])).latent_dist.mean
    t = torch.full((batch,), ex.info.student_timestep)
    context = ex.prompts("").expand(batch, -1, -1)

    @torch.inference_mode()
    def truncated():
        unet_features(ex.unet, latents, t, context, ["us6"])

    @torch.inference_mode()
    def full():
        ex.unet(latents, t, encoder_hidden_states=context)

    return {
        "truncated_vs_full_us6": paired_ratio(truncated, full, repeats),
        "truncated_vs_full_us6_flops": count_flops(full) / count_flops(truncated),
    }


def response_formats(ex: Extractor, image: Image.Image, repeats: int) -> dict[str, float]:
    """All 11 layers of one image: JSON (base64) vs safetensors, size and encode+decode."""
    feats = ex.extract([image], list(LAYER_KEYS))[0]
    meta = ResultMeta(job_id="bench", model="m", model_version="v", timings_ms={"queue": 0.0})
    data = {}
    for key, value in feats.items():
        array = value.half().numpy()
        meta.layers[key] = LayerMeta(shape=list(array.shape), dtype="float16")
        data[key] = array.tobytes()

    loop = asyncio.new_event_loop()  # one loop for every encoding: its start is not timed

    def answer(fmt: str) -> bytes:
        async def collect() -> bytes:
            raw = inline_raw([data[key] for key in meta.layers])
            body = encode(fmt, meta, raw, metadata={"model": "m"}, head={"model": "m"})
            return b"".join([bytes(chunk) async for chunk in body.chunks])

        return loop.run_until_complete(collect())

    def json_round_trip() -> int:
        body = json.loads(answer("json"))
        for info in body["features"].values():
            np.frombuffer(base64.b64decode(info["data"]), "<f2").reshape(info["shape"])
        return 0

    def safetensors_round_trip() -> int:
        read_safetensors(answer("safetensors"))
        return 0

    try:
        return {
            "json_vs_safetensors_bytes": len(answer("json")) / len(answer("safetensors")),
            "json_vs_safetensors_encode": paired_ratio(safetensors_round_trip,
                                                       json_round_trip, repeats),
        }
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def train_once_vs_thrice(ex: Extractor, images, batch: int, repeats: int) -> dict[str, float]:
    """A whole trainer step (teacher, student, heads, backward, Adam): student once vs the
    reference's three times."""
    unet = copy.deepcopy(ex.unet).float().requires_grad_(True)
    student = Student(unet, {k: v.channels for k, v in ex.info.layers.items()})
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-6,
                                 fused=True)
    with torch.no_grad():
        latents = ex.vae.encode(ex.preprocess(images[:batch])).latent_dist.mean
        x0 = latents * ex.vae.config.scaling_factor
    context = ex.prompts("").expand(batch, -1, -1)

    def step(thrice: bool) -> None:
        gen = torch.Generator().manual_seed(0)
        loss, _ = distill_loss(student, ex.unet, ex.noise_scheduler, x0, context, gen,
                               repeat_student=thrice)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {
        "train_once_vs_thrice": paired_ratio(lambda: step(False), lambda: step(True), repeats),
        "train_once_vs_thrice_flops": count_flops(lambda: step(True))
        / count_flops(lambda: step(False)),
    }
