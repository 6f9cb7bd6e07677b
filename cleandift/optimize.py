"""Opt-in speed-ups for a diffusers UNet / VAE that keep the hook-based read-out intact."""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """torch.compile the forward of every ResNet and transformer block.

    Compiling `forward` (not the module) leaves `__call__` and its hooks eager, so the
    feature capture and the early stop keep working. Returns how many blocks were compiled.
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    count = 0
    for module in model.modules():
        if isinstance(module, ResnetBlock2D | BasicTransformerBlock):
            module.forward = torch.compile(module.forward, **compile_kwargs)
            count += 1
    return count


def channels_last(*models: nn.Module) -> None:
    for model in models:
        model.to(memory_format=torch.channels_last)
