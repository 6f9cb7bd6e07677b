"""Opt-in speed-ups for a diffusers UNet / VAE that keep the hook-based read-out intact."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> int:
    """torch.compile the forward of every ResNet and transformer block.

    Compiling `forward` (not the module) leaves `__call__` and its hooks eager, so the
    feature capture and the early stop keep working. Returns how many blocks were compiled.
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    blocks = [m for m in model.modules() if isinstance(m, ResnetBlock2D | BasicTransformerBlock)]
    # Each block instance is its own guard set: allow that many compiled variants.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name,
                    max(getattr(torch._dynamo.config, name), 2 * len(blocks)))
    for module in blocks:
        module.forward = torch.compile(module.forward, **compile_kwargs)  # type: ignore[method-assign]
    return len(blocks)


def channels_last(*models: nn.Module) -> None:
    for model in models:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
