"""Configs of the model families we serve: the real SD 1.5 / 2.1 shapes and small
variants that run on a laptop CPU: SD2.1-shaped (demo, bench) and SD1.5-shaped (demo15).

The real configs let tests and GPU benchmarks build the exact architecture with random
weights, without any download.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Config = dict[str, Any]

_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
SCALED_LINEAR = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
# SD 1.5's scheduler. PNDMScheduler takes no `clip_sample` (SD 1.5's published config lists
# it, but from_config drops it; the constructor that write_model calls refuses it).
PNDM = {
    **{k: v for k, v in SCALED_LINEAR.items() if k != "clip_sample"},
    "prediction_type": "epsilon",
    "skip_prk_steps": True,
}


@dataclass(frozen=True)
class Architecture:
    """Everything needed to instantiate an SD-shaped model folder."""

    name: str
    input_size: int
    unet: Config
    vae: Config
    text: Config
    scheduler_class: str
    scheduler: Config = field(default_factory=dict)


def _unet(channels: Sequence[int], heads: Sequence[int], cross_dim: int, sample_size: int,
          linear_proj: bool, groups: int = 32, upcast: bool = False) -> Config:
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": _DOWN,
        "up_block_types": _UP,
        "block_out_channels": list(channels),
        "layers_per_block": 2,
        "attention_head_dim": list(heads),
        "cross_attention_dim": cross_dim,
        "use_linear_projection": linear_proj,
        "upcast_attention": upcast,
        "norm_num_groups": groups,
    }


def _vae(channels: Sequence[int], sample_size: int, groups: int = 32) -> Config:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": list(channels),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": groups,
        "sample_size": sample_size,
        "scaling_factor": 0.18215,
    }


def _text(hidden: int, layers: int, heads: int, vocab: int = 49408,
          act: str = "gelu") -> Config:
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "projection_dim": hidden,
    }


SD21 = Architecture(
    name="stable-diffusion-2-1",
    input_size=768,
    unet=_unet((320, 640, 1280, 1280), (5, 10, 20, 20), 1024, 96, True, upcast=True),
    vae=_vae((128, 256, 512, 512), 768),
    text=_text(1024, 23, 16),
    scheduler_class="DDIMScheduler",
    scheduler={**SCALED_LINEAR, "prediction_type": "v_prediction"},
)

SD15 = Architecture(
    name="stable-diffusion-v1-5",
    input_size=512,
    unet=_unet((320, 640, 1280, 1280), (8, 8, 8, 8), 768, 64, False),
    vae=_vae((128, 256, 512, 512), 512),
    text=_text(768, 12, 12, act="quick_gelu"),
    scheduler_class="PNDMScheduler",
    scheduler=dict(PNDM),
)

# The text encoder of the small models uses a byte-level vocabulary (see demo.py).
SMALL_VOCAB = 514

DEMO = Architecture(
    name="cleandift-demo",
    input_size=256,
    unet=_unet((32, 32, 64, 64), (2, 2, 4, 4), 32, 32, True, groups=8, upcast=True),
    vae=_vae((16, 32, 32, 32), 256, groups=8),
    text=_text(32, 2, 2, vocab=SMALL_VOCAB),
    scheduler_class="DDIMScheduler",
    scheduler={**SCALED_LINEAR, "prediction_type": "v_prediction"},
)

# SD1.5-shaped (epsilon prediction, PNDM, conv projection in the transformers, no attention
# upcast, quick-GELU text encoder, the same head count in every block) and deliberately
# unlike DEMO everywhere a client can see it: other channels, another input size and a
# 4x VAE (3 blocks) instead of 8x, so that every layer's stride differs too. Served beside
# DEMO it makes a fleet of two genuinely different models on one laptop.
DEMO15 = Architecture(
    name="cleandift-demo15",
    input_size=192,
    unet=_unet((32, 48, 64, 96), (4, 4, 4, 4), 48, 48, False, groups=16),
    vae=_vae((16, 32, 32), 192, groups=8),
    text=_text(48, 2, 4, vocab=SMALL_VOCAB, act="quick_gelu"),
    scheduler_class="PNDMScheduler",
    scheduler=dict(PNDM),
)

BENCH = Architecture(
    name="cleandift-bench",
    input_size=256,
    unet=_unet((64, 128, 256, 256), (2, 4, 8, 8), 128, 32, True, upcast=True),
    vae=_vae((32, 64, 64, 64), 256),
    text=_text(128, 2, 2, vocab=SMALL_VOCAB),
    scheduler_class="DDIMScheduler",
    scheduler={**SCALED_LINEAR, "prediction_type": "v_prediction"},
)

ARCHITECTURES = {"demo": DEMO, "demo15": DEMO15, "bench": BENCH, "sd21": SD21, "sd15": SD15}
