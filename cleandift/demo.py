"""Small SD-shaped models written in the diffusers folder layout, from a config and a seed.

They are real diffusers models loaded by the same code as real weights, so the demo, the
tests and the CPU benchmark exercise the production paths without any download.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .architectures import ARCHITECTURES, Architecture
from .hf import quiet_progress_bars
from .method import CORRESPONDENCE_LAYER, STUDENT_TIMESTEP
from .prompts import EMPTY_PROMPT_FILE, PromptEncoder

log = logging.getLogger(__name__)
METADATA_FILE = "cleandift.json"


def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet (with and without end-of-word) plus specials."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    alphabet = [chr(c) for c in chars]
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def _write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True)
    vocab = _byte_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _model_index(arch: Architecture) -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", arch.scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_model(arch: Architecture, out_dir: Path, *, seed: int = 0,
                device: str = "cpu") -> Path:
    """Create the model with a fixed seed and write it (fp16 weights) to `out_dir`.

    `device="cuda"` initialises a full-size architecture (SD2.1) in seconds instead of
    minutes; the weights then differ from a CPU-initialised model of the same seed.
    """
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    quiet_progress_bars()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    torch.manual_seed(seed)
    modules: list[tuple[Any, str, dict[str, Any]]] = [
        (UNet2DConditionModel, "unet", arch.unet), (AutoencoderKL, "vae", arch.vae)]
    with torch.device(device):
        for cls, folder, config in modules:
            cls(**config).half().save_pretrained(out_dir / folder)
    vocab = _byte_vocab()
    text_config = CLIPTextConfig(
        **arch.text,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    with torch.device(device):
        text_encoder: Any = CLIPTextModel(text_config)
    text_encoder.eval().half().save_pretrained(out_dir / "text_encoder")
    _write_tokenizer(out_dir / "tokenizer")
    scheduler_cls = getattr(diffusers, arch.scheduler_class)
    scheduler_cls(**arch.scheduler).save_pretrained(out_dir / "scheduler")
    (out_dir / "model_index.json").write_text(json.dumps(_model_index(arch), indent=2))
    metadata = {
        "name": arch.name,
        "input_size": arch.input_size,
        "student_timestep": STUDENT_TIMESTEP,
        "default_layers": [CORRESPONDENCE_LAYER],
        "correspondence_layer": CORRESPONDENCE_LAYER,
        "version": f"demo-seed{seed}",
        "seed": seed,
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))

    def load_text() -> tuple[Any, torch.nn.Module]:
        tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer")
        encoder: Any = CLIPTextModel.from_pretrained(out_dir / "text_encoder")
        return tokenizer, encoder.float()

    encoder = PromptEncoder(
        load_text,
        device=torch.device("cpu"),
        dtype=torch.float32,
        empty_cache_files=[out_dir / EMPTY_PROMPT_FILE],
    )
    encoder("")  # computes and stores the cached empty-prompt embedding
    return out_dir


def ensure_model(kind: str, cache_dir: Path, *, seed: int = 0) -> Path:
    """The model folder of a built-in variant, created once (atomically) in the cache."""
    arch = ARCHITECTURES[kind]
    target = Path(cache_dir) / "models" / f"{arch.name}-seed{seed}"
    if (target / METADATA_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("creating the %s model (seed %d) in %s", arch.name, seed, target)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        write_model(arch, staging / "model", seed=seed)
        try:
            os.rename(staging / "model", target)
        except OSError:
            if not (target / METADATA_FILE).is_file():  # not a concurrent creator's win
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
