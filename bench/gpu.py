"""GPU benchmark (bench/gpu.sh): the real SD2.1 architecture with random weights, fp16 at
768, no downloads. Where the forward's time goes (VAE encoder and UNet, by op family);
extractor images/s and MFU by batch size, eager and compiled; compile time at start-up;
the service end to end at 16 and 32 clients (safetensors, results worker -> API) and its
ratio to the extractor; the trainer's step (student once vs thrice).

Figures are written to the JSON file after every phase, so a run cut short keeps what it
measured. Phases run in order of importance and are skipped once the time budget is spent.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cleandift.architectures import ARCHITECTURES
from cleandift.demo import write_model
from cleandift.loading import load_extractor

from . import gpu_phases as ph
from .measure import count_flops

# The trainer before compile (it mutates the UNet); fleet: serve on 1 GPU vs all of them.
PHASES = "profile,eager,trainer,compile,service,fleet"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--arch", default="sd21", choices=sorted(ARCHITECTURES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cleandift-gpu-bench"))
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--phases", default=PHASES, help="which phases to run, in this order")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.monotonic()
    arch = ARCHITECTURES[args.arch]
    device = torch.device(args.device)
    size, batches = arch.input_size, [int(b) for b in args.batches.split(",")]
    repeats = 3 if args.quick else 5
    report: dict[str, Any] = {
        "arch": arch.name, "input_size": size, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "extractor": [], "skipped": []}

    def save(phase: str) -> None:
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"[{report['elapsed_s']:6.1f}s] {phase} done", flush=True)

    model_dir = args.workdir / arch.name
    if not (model_dir / "cleandift.json").is_file():
        write_model(arch, model_dir, device=args.device)
    cache_dir = args.workdir / "cache"
    ex = load_extractor(model_dir, device=args.device, cache_dir=cache_dir)
    report["model_write_and_load_s"] = round(time.monotonic() - start, 1)
    flops = count_flops(lambda: ex.features(ph.uint8_batch(1, size), ["us6"]))
    peak = ph.peak_tflops(device)
    report.update(flops_per_image_tflop=round(flops / 1e12, 4), peak_tflops=peak,
                  fp16_vs_fp32_cosine_us6=ph.precision_check(ex, model_dir, size))
    save("setup")

    def rows(variant: str) -> None:
        report["extractor"] += ph.extractor_rows(ex, variant, batches, size, repeats, flops, peak)

    def compiled() -> None:
        report.update(ph.compile_rows(ex, cache_dir))
        rows("compiled")

    def service() -> None:
        best = max((r["images_per_s"] for r in report["extractor"]), default=None)
        figures = ph.service_rows(ex, model_dir, cache_dir, args.device, args.quick,
                                  compiled=any(r["variant"] == "compiled"
                                               for r in report["extractor"]))
        report.update(figures)
        if best:
            report["service_vs_extractor_c32"] = round(
                figures["service_images_per_s_safetensors_c32"] / best, 3)

    phases: dict[str, Callable[[], None]] = {
        "profile": lambda: report.update(ph.profile_rows(ex, 8 if device.type == "cuda" else 1,
                                                         size)),
        "eager": lambda: rows("eager"),
        "compile": compiled,
        "service": service,
        "fleet": lambda: report.update(ph.fleet_rows(model_dir, cache_dir,
                                                     *ph.us6_request(ex), args.quick)),
        "trainer": lambda: report.update(ph.trainer_rows(ex, args.train_batch, size,
                                                         2 if args.quick else 3)),
    }
    for name in args.phases.split(","):
        if time.monotonic() - start > args.budget_s:
            report["skipped"].append(name)
            continue
        try:
            phases[name]()
        except Exception as exc:  # record and go on: one failing phase must not lose the rest
            report.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:500]
        save(name)


if __name__ == "__main__":
    main()
