"""GPU benchmark (bench/gpu.sh): the real SD2.1 architecture with random weights, fp16 at
768, no downloads. Extractor images/s per batch size and optimisation, model FLOPs
utilisation, the service end to end, and the trainer's step (student once vs thrice).

Figures are written to the JSON file after every phase, so a run cut short keeps what it
measured. Phases run in order of importance and are skipped once the time budget is spent.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cleandift.architectures import ARCHITECTURES
from cleandift.demo import write_model
from cleandift.loading import load_extractor
from cleandift.optimize import channels_last, compile_blocks

from .load import features_request, run_load
from .measure import count_flops
from .stack import service_stack

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense fp16/bf16, datasheets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
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


class GraphedFeatures:
    """The whole extractor forward (VAE encoder + truncated UNet) as one CUDA graph."""

    def __init__(self, ex, batch: int, size: int, layers: list[str]) -> None:
        self.input = torch.zeros(batch, 3, size, size, device=ex.device, dtype=ex.dtype)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                ex.features(self.input, layers)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = ex.features(self.input, layers)

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        self.input.copy_(pixels)
        self.graph.replay()
        return self.output


def extractor_rows(ex, variant: str, batches, size, repeats, flops_per_image, peak) -> list:
    rows = []
    for batch in batches:
        pixels = torch.randn(batch, 3, size, size, device=ex.device, dtype=ex.dtype)
        if variant in ("channels_last", "compile"):
            pixels = pixels.to(memory_format=torch.channels_last)
        if variant == "cuda_graphs":
            run = GraphedFeatures(ex, batch, size, ["us6"])
            seconds = timed(lambda r=run, p=pixels: r(p), ex.device, repeats)
        else:
            seconds = timed(lambda p=pixels: ex.features(p, ["us6"]), ex.device, repeats)
        ips = batch / seconds
        mfu = flops_per_image * ips / (peak * 1e12) if peak else None
        rows.append({"variant": variant, "batch": batch, "images_per_s": round(ips, 2),
                     "mfu": round(mfu, 4) if mfu else None})
        print(f"  {variant:14s} batch {batch:3d}: {ips:8.2f} images/s  MFU {mfu or 0:.3f}",
              flush=True)
    return rows


def trainer_rows(ex, batch: int, size: int, repeats: int) -> dict:
    from cleandift.trainer.distill import Student, distill_loss

    cuda = ex.device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    teacher = copy.deepcopy(ex.unet).to(dtype)
    with torch.no_grad():
        pixels = torch.randn(batch, 3, size, size, device=ex.device, dtype=ex.dtype)
        x0 = (ex.vae.encode(pixels).latent_dist.mean * ex.vae.config.scaling_factor).to(dtype)
    context = ex.prompts("").to(dtype).expand(batch, -1, -1)
    out: dict[str, Any] = {}
    for thrice in (False, True):
        student = Student(copy.deepcopy(ex.unet).float().requires_grad_(True),
                          {k: v.channels for k, v in ex.info.layers.items()}).to(ex.device)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-6, fused=True)
        gen = torch.Generator().manual_seed(0)
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None

        def step(s=student, o=optimizer, t=thrice, g=gen, a=autocast):
            loss, _ = distill_loss(s, teacher, ex.noise_scheduler, x0, context, g, a,
                                   repeat_student=t)
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)

        key = "thrice" if thrice else "once"
        if cuda:
            torch.cuda.reset_peak_memory_stats(ex.device)
        try:
            seconds = timed(step, ex.device, repeats)
        except torch.cuda.OutOfMemoryError:  # the reference's 3x batch may not fit
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            student.unet.enable_gradient_checkpointing()  # type: ignore[operator]
            out[f"train_grad_checkpointing_{key}"] = True
            torch.cuda.reset_peak_memory_stats(ex.device)
            seconds = timed(step, ex.device, repeats)
        out[f"train_s_per_step_{key}"] = round(seconds, 4)
        out[f"train_projected_400_steps_min_{key}"] = round(seconds * 400 / 60, 2)
        if cuda:
            out[f"train_peak_memory_gib_{key}"] = round(
                torch.cuda.max_memory_allocated(ex.device) / 2**30, 2)
        print(f"  trainer student {key}: {seconds:.3f} s/step", flush=True)
        del student, optimizer, params
        if cuda:
            torch.cuda.empty_cache()
    out["train_once_vs_thrice"] = round(out["train_s_per_step_thrice"]
                                        / out["train_s_per_step_once"], 3)
    return out


def precision_check(ex, model_dir: Path, pixels: torch.Tensor) -> float | None:
    """Mean cosine between the served precision's us6 and an fp32 run of the same model."""
    if ex.dtype == torch.float32:
        return None
    reference = load_extractor(model_dir, device=ex.device, dtype=torch.float32)
    low = ex.features(pixels, ["us6"])["us6"].float()
    high = reference.features(pixels.float(), ["us6"])["us6"]
    del reference
    torch.cuda.empty_cache()
    return round(torch.nn.functional.cosine_similarity(low, high, dim=1).mean().item(), 5)


def service_rows(model_dir: Path, size: int, device: str, quick: bool) -> dict:
    """The stack as deployed on a GPU box: one worker, several API processes, and client
    processes enough that the load generator is not what is measured."""
    import numpy as np

    from cleandift.trainer.synthetic import synthetic_image

    image = synthetic_image(size, np.random.default_rng(0))[0]
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    out = {}
    with service_stack(str(model_dir), device=device, max_batch="32", api_workers="6",
                       max_batch_pixels=str(32 * size * size), max_queue="1024") as stack:
        plan = [("json", 1, 20), ("json", 16, 160 if quick else 320),
                ("safetensors", 1, 20), ("safetensors", 16, 160 if quick else 320),
                ("safetensors", 32, 320 if quick else 640)]
        for fmt, concurrency, total in plan:
            request = features_request(buf.getvalue(), params={"format": fmt})
            if concurrency > 1:
                run_load(stack.url, request, concurrency=concurrency, total=concurrency * 2,
                         processes=4)  # warm-up
            result = run_load(stack.url, request, concurrency=concurrency, total=total,
                              processes=min(4, concurrency))
            name = f"{fmt}_c{concurrency}"
            out[f"service_images_per_s_{name}"] = round(result.throughput(), 2)
            out[f"service_latency_ms_p50_{name}"] = round(result.percentile_ms(50), 1)
            out[f"service_latency_ms_p95_{name}"] = round(result.percentile_ms(95), 1)
            print(f"  service {name}: {result.throughput():.2f} images/s", flush=True)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--arch", default="sd21", choices=sorted(ARCHITECTURES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cleandift-gpu-bench"))
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--phases", default="eager,channels_last,trainer,service,cuda_graphs,"
                        "compile", help="which phases to run, in this order")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.monotonic()
    arch = ARCHITECTURES[args.arch]
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    repeats = 3 if args.quick else 5
    report: dict = {"arch": arch.name, "input_size": arch.input_size, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "extractor": [], "skipped": []}

    def save(phase: str) -> None:
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"[{report['elapsed_s']:6.1f}s] {phase} done", flush=True)

    model_dir = args.workdir / arch.name
    if not (model_dir / "cleandift.json").is_file():
        write_model(arch, model_dir, device=args.device)
    ex = load_extractor(model_dir, device=args.device)
    report["model_write_and_load_s"] = round(time.monotonic() - start, 1)
    pixels = torch.randn(1, 3, arch.input_size, arch.input_size, device=device, dtype=ex.dtype)
    flops = count_flops(lambda: ex.features(pixels, ["us6"]))
    report["fp16_vs_fp32_cosine_us6"] = precision_check(ex, model_dir, pixels)
    peak = peak_tflops(device)
    report.update(flops_per_image_tflop=round(flops / 1e12, 4), peak_tflops=peak)
    save("setup")

    def extractor_phase(variant: str) -> None:
        if variant == "channels_last":
            channels_last(ex.vae, ex.unet)
        if variant == "compile":
            compile_blocks(ex.unet)
            compile_blocks(ex.vae)
        report["extractor"] += extractor_rows(ex, variant, batches, arch.input_size, repeats,
                                              flops, peak)

    phases: list[tuple[str, Callable[[], object]]] = [
        ("eager (SDPA)", lambda: extractor_phase("eager")),
        ("channels_last", lambda: extractor_phase("channels_last")),
        ("trainer", lambda: report.update(trainer_rows(ex, args.train_batch, arch.input_size,
                                                       2 if args.quick else 3))),
        ("service", lambda: report.update(service_rows(model_dir, arch.input_size, args.device,
                                                       args.quick))),
    ]
    if device.type == "cuda":
        phases.append(("cuda_graphs", lambda: extractor_phase("cuda_graphs")))
        phases.append(("compile", lambda: extractor_phase("compile")))
    wanted = args.phases.split(",")
    phases = [p for p in phases if p[0].split(" ")[0] in wanted]
    for name, run in phases:
        if time.monotonic() - start > args.budget_s:
            report["skipped"].append(name)
            continue
        try:
            run()
        except Exception as exc:  # record and go on: one failing phase must not lose the rest
            report.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:500]
        save(name)


if __name__ == "__main__":
    main()
