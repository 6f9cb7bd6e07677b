"""The GPU script's measurements (bench/gpu.py runs them): each returns JSON-ready rows.

They run on CPU too (the tests run them on the demo architecture), where MFU is absent.
"""

from __future__ import annotations

import copy
import functools
import io
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cleandift.extractor import Extractor
from cleandift.loading import load_extractor
from cleandift.optimize import compile_extractor

from .stack import service_stack
from .transport import threaded_client

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense fp16/bf16, datasheets
OP_GROUPS = {"conv": ("conv", "cudnn_convolution"), "group_norm": ("group_norm",),
             "attention": ("attention", "sdpa", "flash", "bmm", "baddbmm", "softmax"),
             "matmul": ("addmm", "mm", "linear"), "elementwise": ("add", "mul", "silu", "gelu",
                                                                 "copy", "to", "div")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def uint8_batch(batch: int, size: int) -> torch.Tensor:
    """What the worker hands the extractor: uint8 NHWC pixels (converted on the device)."""
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)


def extractor_rows(ex: Extractor, variant: str, batches: list[int], size: int, repeats: int,
                   flops_per_image: float, peak: float | None) -> list[dict[str, Any]]:
    rows = []
    for batch in batches:
        seconds = timed(functools.partial(ex.features, uint8_batch(batch, size), ["us6"]),
                        ex.device, repeats)
        ips = batch / seconds
        mfu = flops_per_image * ips / (peak * 1e12) if peak else None
        rows.append({"variant": variant, "batch": batch, "images_per_s": round(ips, 2),
                     "mfu": round(mfu, 4) if mfu else None})
        print(f"  {variant:9s} batch {batch:3d}: {ips:8.2f} images/s  MFU {mfu or 0:.3f}",
              flush=True)
    return rows


def profile_rows(ex: Extractor, batch: int, size: int) -> dict[str, Any]:
    """Where the forward's device time goes, VAE encoder and UNet apart, by op family."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if ex.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    pixels = ex.model_input(uint8_batch(batch, size))
    out: dict[str, Any] = {}
    with torch.inference_mode():
        latents = ex.vae.encode(pixels).latent_dist.mean * ex.vae.config.scaling_factor
        parts = {"vae": lambda: ex.vae.encode(pixels),
                 "unet_to_us6": lambda: ex.features(pixels, ["us6"])}
        for name, run in parts.items():
            run()
            sync(ex.device)
            with profile(activities=activities) as prof:
                run()
                sync(ex.device)
            out[f"profile_{name}"] = _grouped(prof.key_averages(), ex.device.type == "cuda")
    del latents
    return out


def _grouped(events: Any, cuda: bool) -> dict[str, float]:
    """Self time (ms) by op family, and each family's share of the total."""
    groups: dict[str, float] = defaultdict(float)
    for event in events:
        if not event.key.startswith("aten::"):
            continue
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        name = event.key[len("aten::"):]
        family = next((g for g, words in OP_GROUPS.items() if any(w in name for w in words)),
                      "other")
        groups[family] += us / 1000
    total = sum(groups.values()) or 1.0
    return {**{k: round(v, 2) for k, v in groups.items()},
            **{f"{k}_share": round(v / total, 3) for k, v in groups.items()}}


def compile_rows(ex: Extractor, cache_dir: Path) -> dict[str, Any]:
    """Compile as a worker does at start-up (cold cache), then the batches as above."""
    seconds = compile_extractor(ex, cache_dir)
    return {"compile_startup_cold_s": round(seconds, 1)}


def precision_check(ex: Extractor, model_dir: Path, size: int) -> float | None:
    """Mean cosine between the served precision's us6 and an fp32 run of the same model."""
    if ex.dtype == torch.float32:
        return None
    pixels = uint8_batch(2, size)
    reference = load_extractor(model_dir, device=ex.device, dtype=torch.float32)
    low = ex.features(pixels, ["us6"])["us6"].float()
    high = reference.features(pixels, ["us6"])["us6"]
    del reference
    torch.cuda.empty_cache()
    return round(torch.nn.functional.cosine_similarity(low, high, dim=1).mean().item(), 5)


def service_rows(ex: Extractor, model_dir: Path, cache_dir: Path, device: str, quick: bool,
                 compiled: bool) -> dict[str, Any]:
    """The stack as deployed on a GPU box: one worker (compiled at start-up if asked, from
    the warm cache), several API processes, an efficient client (threads, safetensors)."""
    size = ex.info.input_size
    jpeg, shapes = us6_request(ex)
    out: dict[str, Any] = {}
    with service_stack(str(model_dir), device=device, max_batch="32", api_workers="6",
                       max_batch_pixels=str(32 * size * size), max_queue="1024",
                       compile=str(compiled).lower(), cache_dir=str(cache_dir),
                       ready_timeout_s=900) as stack:
        for concurrency in (16, 32):
            threaded_client(stack.url, jpeg, "us6", concurrency, concurrency, shapes)
            total = concurrency * (8 if quick else 16)
            seconds, ok = threaded_client(stack.url, jpeg, "us6", concurrency, total, shapes)
            key = f"service_images_per_s_safetensors_c{concurrency}"
            out[key] = round(ok / seconds, 2)
            print(f"  service c{concurrency}: {ok / seconds:.2f} images/s", flush=True)
    return out


def us6_request(ex: Extractor) -> tuple[bytes, dict[str, tuple[int, ...]]]:
    """A photo-like JPEG at the model's size, and the us6 shape its answer has."""
    import numpy as np

    from cleandift.trainer.synthetic import synthetic_image

    size = ex.info.input_size
    layer = ex.info.layers["us6"]
    image = synthetic_image(size, np.random.default_rng(0))[0]
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue(), {"us6": (layer.channels, size // layer.stride, size // layer.stride)}


def trainer_rows(ex: Extractor, batch: int, size: int, repeats: int) -> dict[str, Any]:
    """A whole trainer step: student once (ours) vs three times (the reference)."""
    from cleandift.trainer.distill import Student, distill_loss

    cuda = ex.device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    teacher = copy.deepcopy(ex.unet).to(dtype)
    with torch.no_grad():
        pixels = ex.model_input(uint8_batch(batch, size))
        x0 = (ex.vae.encode(pixels).latent_dist.mean * ex.vae.config.scaling_factor).to(dtype)
    context = ex.prompts("").to(dtype).expand(batch, -1, -1)
    out: dict[str, Any] = {}
    for thrice in (False, True):
        student = Student(copy.deepcopy(ex.unet).float().requires_grad_(True),
                          {k: v.channels for k, v in ex.info.layers.items()}).to(ex.device)
        optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad],
                                     lr=1e-6, fused=True)
        gen = torch.Generator().manual_seed(0)
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None

        def step(s: Student = student, o: torch.optim.Optimizer = optimizer,
                 t: bool = thrice, g: torch.Generator = gen, a: Any = autocast) -> None:
            loss, _ = distill_loss(s, teacher, ex.noise_scheduler, x0, context, g, a,
                                   repeat_student=t)
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)

        key = "thrice" if thrice else "once"
        if cuda:
            torch.cuda.reset_peak_memory_stats(ex.device)
        seconds = timed(step, ex.device, repeats)
        out[f"train_s_per_step_{key}"] = round(seconds, 4)
        if cuda:
            out[f"train_peak_memory_gib_{key}"] = round(
                torch.cuda.max_memory_allocated(ex.device) / 2**30, 2)
        print(f"  trainer student {key}: {seconds:.3f} s/step", flush=True)
        del student, optimizer
        if cuda:
            torch.cuda.empty_cache()
    out["train_once_vs_thrice"] = round(out["train_s_per_step_thrice"]
                                        / out["train_s_per_step_once"], 3)
    return out


def fleet_rows(model_dir: Path, cache_dir: Path, jpeg: bytes, shapes: dict[str, tuple[int, ...]],
               quick: bool) -> dict[str, Any]:
    """`cleandift serve` on one GPU, then on every GPU of the box (one worker each): the
    images/s each gives, side by side in one run. One GPU: only the first figure."""
    import os
    import signal
    import subprocess
    import sys

    from cleandift.service.processes.redis_server import free_port

    gpus = torch.cuda.device_count()
    out: dict[str, Any] = {"fleet_gpus": gpus}
    for devices, label in (("0", "1"), ("all", "all")):
        if label == "all" and gpus < 2:
            break
        port = free_port()
        env = {**os.environ, "CLEANDIFT_CACHE_DIR": str(cache_dir), "CLEANDIFT_MAX_BATCH": "32",
               "CLEANDIFT_MAX_BATCH_PIXELS": str(32 * 768 * 768), "CLEANDIFT_MAX_QUEUE": "4096",
               "CLEANDIFT_API_WORKERS": "6", "CLEANDIFT_WORKER_PORT": "0",
               # One image sent again and again: with the cache on this would measure hits.
               "CLEANDIFT_FEATURE_CACHE_BYTES": "0", "CLEANDIFT_FEATURE_CACHE_SHARED_BYTES": "0"}
        serve = subprocess.Popen([sys.executable, "-m", "cleandift.cli", "serve", "--model",
                                  str(model_dir), "--devices", devices, "--port", str(port)],
                                 env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, expect_workers=gpus if label == "all" else 1)
            concurrency = 32 * (gpus if label == "all" else 1)
            threaded_client(url, jpeg, "us6", concurrency, concurrency, shapes)  # warm-up
            seconds, ok = threaded_client(url, jpeg, "us6", concurrency,
                                          concurrency * (4 if quick else 8), shapes)
            out[f"fleet_images_per_s_{label}_gpus"] = round(ok / seconds, 2)
            print(f"  serve on {label} GPU(s): {ok / seconds:.2f} images/s", flush=True)
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=60)
    if "fleet_images_per_s_all_gpus" in out:
        out["fleet_all_vs_one"] = round(out["fleet_images_per_s_all_gpus"]
                                        / out["fleet_images_per_s_1_gpus"], 3)
    return out


def _wait_ready(url: str, expect_workers: int, timeout_s: float = 900) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(url + "/readyz", timeout=2)
            if answer.status_code == 200 and answer.json()["workers"] >= expect_workers:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"serve at {url} never had {expect_workers} ready workers")
