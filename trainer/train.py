"""The CleanDIFT distillation loop (one readable loop; the pieces live next door).

Run on 1 or N GPUs with the same code: `accelerate launch -m cleandift.cli train ...`.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cleandift import official
from cleandift.datasets.sources import load_records
from cleandift.extractor import Extractor
from cleandift.loading import load_extractor
from cleandift.optimize import compile_blocks
from cleandift.warps import Sample

from .checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import BatchStream
from .distill import (
    FIDELITY_TIMESTEPS,
    Student,
    alignment,
    distill_loss,
    freeze_unused,
    teacher_features,
)
from .gate import check
from .publish import publish_weights
from .quality import eval_samples, live_scorer, warp_score

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """Everything the loop touches, built once."""

    accelerator: Any  # accelerate.Accelerator (imported lazily)
    extractor: Extractor  # teacher side: VAE, frozen UNet, scheduler, prompts
    student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stream: BatchStream
    holdout: tuple[torch.Tensor, list[str]]
    generator: torch.Generator
    size: int
    warp_samples: list[Sample] = field(default_factory=list)  # the warp score's images


def build(cfg: TrainConfig) -> Setup:
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16"  # CPUs run bf16 autocast too (slowly): to compare
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no")
    per_process = cfg.per_process_batch(accelerator.num_processes)
    if cuda and not bf16:  # the official recipe: fp32 weights, TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    teacher_dtype = torch.bfloat16 if bf16 else torch.float32
    extractor = load_extractor(cfg.teacher, device=accelerator.device, dtype=teacher_dtype,
                               cache_dir=cfg.cache_dir)
    size = cfg.size or extractor.info.input_size
    torch.manual_seed(cfg.seed)  # the heads' Fourier frequencies
    unet = copy.deepcopy(extractor.unet).float().requires_grad_(True).train()
    channels = {k: v.channels for k, v in extractor.info.layers.items()}
    student = Student(unet, channels, extractor.info.student_timestep)
    if cfg.init_from is not None:
        init_from_full(student, cfg.init_from)
    student = student.to(accelerator.device)
    frozen = freeze_unused(student, unet.config.in_channels, unet.config.cross_attention_dim)
    log.info("%d UNet modules after the last key are frozen (never run)", len(frozen))
    if cfg.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.compile:
        log.info("compiled %d blocks", compile_blocks(unet))
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, fused=True)
    student, optimizer = accelerator.prepare(student, optimizer)
    records = load_records(cfg.data)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed))
    held = [records[i] for i in order[: min(cfg.holdout, len(records) - 1)].tolist()]
    train_records = [records[i] for i in order[len(held):].tolist()]
    stream = BatchStream(train_records, size=size, batch_size=per_process, seed=cfg.seed,
                         rank=accelerator.process_index, world=accelerator.num_processes,
                         resample=cfg.resize)
    holdout_stream = BatchStream(held, size=size, batch_size=len(held), seed=cfg.seed,
                                 resample=cfg.resize)
    holdout = holdout_stream.next_batch()
    stream.skipped = holdout_stream.skipped  # corrupt held-out images count too
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + accelerator.process_index)
    samples = eval_samples(cfg.eval_warps, held) if accelerator.is_main_process else []
    return Setup(accelerator, extractor, student, optimizer, stream, holdout, generator, size,
                 samples)


def init_from_full(student: Student, path: Path) -> None:
    """Student UNet, heads and learned timestep of an official full checkpoint."""
    checkpoint = official.read_full(path, heads=True)
    student.unet.load_state_dict(checkpoint.unet, strict=True)
    assert checkpoint.heads is not None
    student.heads.load_state_dict(checkpoint.heads, strict=True)
    with torch.no_grad():
        student.timestep.fill_(checkpoint.timestep)
    log.info("started from %s (student timestep %.2f)", path, checkpoint.timestep)


def encode(setup: Setup, pixels: torch.Tensor, captions: list[str], latent: str = "mean"):
    """Clean latents (posterior mean, or a sample, x scaling factor) and caption
    embeddings."""
    ex = setup.extractor
    with torch.no_grad():
        posterior = ex.vae.encode(pixels.to(ex.device, ex.dtype)).latent_dist
        if latent == "sample":
            eps = torch.randn(posterior.mean.shape, generator=setup.generator)
            z = posterior.mean + posterior.std * eps.to(posterior.mean)
        else:
            z = posterior.mean
        x0 = z * ex.vae.config.scaling_factor
        context = torch.cat([ex.prompts(c) for c in captions])
    return x0, context


def warmup_lr(step: int, peak: float, warmup: int) -> float:
    """The rate of optimiser step `step` (0-based), exactly the official schedule
    (transformers' `constant_with_warmup`): step k runs at k / warmup of the peak, so the
    first step runs at 0 (it only primes Adam's moments), then constant. With the recipe's
    400 steps and warm-up 2000 the rate never leaves the warm-up: its last step runs at
    399 / 2000 * 1e-5 = 1.995e-6 (the paper's "about 2e-6")."""
    return peak * min(1.0, step / warmup) if warmup > 0 else peak


def train_step(setup: Setup, cfg: TrainConfig, pixels: torch.Tensor, captions: list[str],
               lr: float):
    ex, acc = setup.extractor, setup.accelerator
    x0, context = encode(setup, pixels, captions, cfg.latent)
    loss, per_key = distill_loss(setup.student, ex.unet, ex.noise_scheduler, x0, context,
                                 setup.generator, acc.autocast, t_range=cfg.t_range)
    acc.backward(loss)
    for group in setup.optimizer.param_groups:
        group["lr"] = lr
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return loss.item(), {k: round(v.item(), 5) for k, v in per_key.items()}


@torch.no_grad()
def fidelity(setup: Setup) -> dict:
    """Mean cosine of head_k(student) vs teacher_k on the held-out batch, per t and key."""
    ex = setup.extractor
    x0, context = encode(setup, *setup.holdout)
    student = setup.accelerator.unwrap_model(setup.student)
    gen = torch.Generator().manual_seed(12345)
    per_t = {}
    for t_value in FIDELITY_TIMESTEPS:
        t = torch.full((len(x0),), t_value, device=ex.device)
        noise = torch.randn(x0.shape, generator=gen).to(ex.device)
        target = teacher_features(ex.unet, ex.noise_scheduler, x0, context, t, noise)
        with setup.accelerator.autocast():
            pred = student(x0.float(), context.float(), t)
        per_t[str(t_value)] = {k: round(v.item(), 5) for k, v in alignment(pred, target)[1].items()}
    values = [v for keys in per_t.values() for v in keys.values()]
    return {"mean": sum(values) / len(values), "per_timestep": per_t}


def warps(setup: Setup) -> dict | None:
    """The student's warp correspondence score (main process only; None without images)."""
    if not setup.accelerator.is_main_process:
        return None
    student = setup.accelerator.unwrap_model(setup.student)
    return warp_score(setup.extractor, student, setup.warp_samples, setup.size,
                      setup.accelerator.autocast, setup.extractor.dtype)


def start_state(cfg: TrainConfig, setup: Setup) -> TrainState:
    checkpoint = latest_checkpoint(cfg.run_dir) if cfg.resume else None
    if checkpoint is not None:
        student = setup.accelerator.unwrap_model(setup.student)
        state = load_checkpoint(checkpoint, student, setup.optimizer, setup.generator)
        setup.stream.cursor, setup.stream.skipped = state.cursor, state.skipped
        log.info("resumed from %s at step %d", checkpoint, state.step)
        return state
    return TrainState(step=0, cursor=0, skipped=0, fidelity_before=fidelity(setup),
                      warps_before=warps(setup))


def train(cfg: TrainConfig) -> tuple[str, Path] | None:
    """Distil, checkpoint, and publish a new version; returns (version, folder)."""
    setup = build(cfg)
    main = setup.accelerator.is_main_process
    state = start_state(cfg, setup)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(range(state.step, cfg.steps), initial=state.step, total=cfg.steps,
               desc="distill", unit="step", disable=not main)
    started = time.perf_counter()
    with open(cfg.run_dir / "log.jsonl", "a") if main else nullcontext(None) as log_file:
        for step in bar:
            pixels, captions = setup.stream.next_batch()
            lr = warmup_lr(step, cfg.lr, cfg.warmup)
            loss, per_key = train_step(setup, cfg, pixels, captions, lr)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", skipped=setup.stream.skipped)
            state = replace(state, step=step + 1, cursor=setup.stream.cursor,
                            skipped=setup.stream.skipped)
            if log_file is None:  # not the main process
                continue
            record = {"step": state.step, "loss": loss, "lr": lr, "cos": per_key,
                      "skipped": state.skipped,
                      "elapsed_s": round(time.perf_counter() - started, 3)}
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < cfg.steps:
                student = setup.accelerator.unwrap_model(setup.student)
                save_checkpoint(cfg.run_dir, state, student, setup.optimizer, setup.generator)
    setup.accelerator.wait_for_everyone()
    return publish(cfg, setup, state) if main else None


def publish(cfg: TrainConfig, setup: Setup, state: TrainState) -> tuple[str, Path]:
    after = fidelity(setup)
    before = state.fidelity_before or {}
    log.info("fidelity before %.4f, after %.4f", before.get("mean", float("nan")), after["mean"])
    student = setup.accelerator.unwrap_model(setup.student)
    heads = {f"heads.{k}": v for k, v in student.heads.state_dict().items()}
    heads["timestep"] = student.timestep.detach().reshape(1)
    manifest = {
        "base": setup.extractor.base_spec,
        "input_size": setup.size,
        "student_timestep": float(student.timestep.detach()),
        "steps": state.step,
        "fidelity_before": before.get("mean"),
        "fidelity_after": after["mean"],
        "fidelity": {"before": before.get("per_timestep"), "after": after["per_timestep"]},
        "warps_before": state.warps_before,
        "warps": warps(setup),
        "data": {"source": cfg.data, "skipped": state.skipped, "samples": state.cursor,
                 "processes": setup.accelerator.num_processes},
        "training": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()
                     if k != "redis_url"},
    }
    manifest["gate"] = gate(cfg, manifest, live_scorer(
        Path(cfg.registry) / cfg.name, setup.warp_samples, setup.size,
        device=setup.accelerator.device, dtype=setup.extractor.dtype,
        autocast=setup.accelerator.autocast, cache_dir=cfg.cache_dir))
    return publish_weights(cfg.registry, cfg.name, student.unet.state_dict(), manifest,
                           heads_state=heads, redis_url=cfg.redis_url, channel=cfg.channel,
                           make_latest=manifest["gate"]["allowed"])


def gate(cfg: TrainConfig, manifest: dict,
         rescore: Callable[[str], dict | None] | None = None) -> dict:
    """The quality gate's verdict on the new version, as the manifest records it: a refused
    version is published but not made LATEST (unless `--force`)."""
    verdict = check(cfg.registry, cfg.name, manifest, cfg.gate_margin, "the new version",
                    rescore)
    forced = cfg.force and not verdict.allowed
    if forced or verdict.warning or not verdict.allowed:
        log.warning("quality gate: %s%s", "forced: " if forced else "", verdict.message)
    else:
        log.info("quality gate: %s", verdict.message)
    return {"allowed": verdict.allowed or cfg.force, "forced": forced,
            "margin": cfg.gate_margin, "message": verdict.message}
