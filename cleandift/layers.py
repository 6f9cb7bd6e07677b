"""The 11 CleanDIFT feature positions and how to read them from a diffusers UNet.

Reading is done with forward hooks; the forward is cut short (an exception raised from
the hook of the last requested key) so no block after it runs. This keeps us on the
upstream `forward` instead of a copy of it that would drift from diffusers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from torch import nn

from .contract import (  # noqa: F401  (re-exported: the public names of this module)
    CORRESPONDENCE_LAYER,
    LAYER_KEYS,
    LAYER_MODULES,
    UnknownLayerError,
    validate_layers,
)


@dataclass(frozen=True)
class LayerInfo:
    channels: int
    stride: int  # input pixels per feature cell, at the model's input size


class _StopForward(Exception):
    """Raised from the hook of the last requested key to end the UNet forward there."""


def _as_tensor(output: object) -> torch.Tensor:
    # Attention modules return an output object (or a tuple with return_dict=False).
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample  # type: ignore[attr-defined]


@contextmanager
def capture(unet: nn.Module, keys: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Hooks that store each key's output and stop the forward after the last key."""
    found: dict[str, torch.Tensor] = {}
    last = keys[-1]
    handles = []

    def make_hook(key: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            found[key] = _as_tensor(output)
            if key == last:
                raise _StopForward

        return hook

    try:
        for key in keys:
            module = unet.get_submodule(LAYER_MODULES[key])
            handles.append(module.register_forward_hook(make_hook(key)))
        yield found
    finally:
        for handle in handles:
            handle.remove()


def unet_features(
    unet: nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor | float,
    text_embeds: torch.Tensor,
    keys: list[str],
) -> dict[str, torch.Tensor]:
    """Run the UNet up to the last of `keys` (execution order) and return each key's map."""
    keys = validate_layers(keys, keys)
    if text_embeds.shape[0] != latents.shape[0]:
        text_embeds = text_embeds.expand(latents.shape[0], -1, -1)
    with capture(unet, keys) as found, suppress(_StopForward):
        unet(latents, timestep, encoder_hidden_states=text_embeds, return_dict=False)
    return {k: found[k] for k in keys}


def probe_layers(unet_config: dict, size: int, vae_scale_factor: int) -> dict[str, LayerInfo]:
    """Channels and stride of every key, from a forward on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        side = size // vae_scale_factor
        latents = torch.empty(1, unet.config.in_channels, side, side)
        context = torch.empty(1, 1, unet.config.cross_attention_dim)
        feats = unet_features(unet, latents, torch.tensor([1.0]), context, list(LAYER_KEYS))
    return {
        k: LayerInfo(channels=int(v.shape[1]), stride=size // int(v.shape[-1]))
        for k, v in feats.items()
    }
