"""The 11 CleanDIFT feature positions and how to read them from a diffusers UNet.

Reading is done with forward hooks; the forward is cut short (an exception raised from
the hook of the last requested key) so no block after it runs. This keeps us on the
upstream `forward` instead of a copy of it that would drift from diffusers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .contract import LayerInfo, validate_layers
from .method import LAYER_KEYS, LAYER_MODULES


class _StopForward(Exception):
    """Raised from the hook of the last requested key to end the UNet forward there."""


def _as_tensor(output: Any) -> torch.Tensor:
    # Attention modules return an output object (or a tuple with return_dict=False).
    tensor = output if isinstance(output, torch.Tensor) else (
        output[0] if isinstance(output, tuple) else output.sample)
    assert isinstance(tensor, torch.Tensor)
    return tensor


@dataclass
class _Capture:
    targets: dict[int, str]  # id(module) -> key
    found: dict[str, torch.Tensor]
    last: str


_active = threading.local()  # .capture: this thread's _Capture, or None


def _read_out(module: nn.Module, _inputs: object, output: object) -> None:
    """One hook on each key module, shared by every capture: it acts only for the capture
    running in the calling thread, so concurrent forwards on one model never mix."""
    state: _Capture | None = getattr(_active, "capture", None)
    key = state.targets.get(id(module)) if state else None
    if state is None or key is None:
        return
    state.found[key] = _as_tensor(output)
    if key == state.last:
        raise _StopForward


def _install(unet: nn.Module) -> None:
    for path in LAYER_MODULES.values():
        module = unet.get_submodule(path)
        if _read_out not in module._forward_hooks.values():
            module.register_forward_hook(_read_out)


@contextmanager
def capture(unet: nn.Module, keys: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, this thread's forwards of `unet` store each key's output and stop
    after the last key. Outside it (other threads, backward recomputation) hooks do nothing."""
    _install(unet)
    found: dict[str, torch.Tensor] = {}
    targets = {id(unet.get_submodule(LAYER_MODULES[k])): k for k in keys}
    previous = getattr(_active, "capture", None)
    _active.capture = _Capture(targets, found, keys[-1])
    try:
        yield found
    finally:
        _active.capture = previous


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


def probe_layers(
    unet_config: dict[str, Any], size: int, vae_scale_factor: int
) -> dict[str, LayerInfo]:
    """Channels and stride of every key, from a forward on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet: Any = UNet2DConditionModel.from_config(unet_config)  # type: ignore[no-untyped-call]
        side = size // vae_scale_factor
        latents = torch.empty(1, unet.config.in_channels, side, side)
        context = torch.empty(1, 1, unet.config.cross_attention_dim)
        feats = unet_features(unet, latents, torch.tensor([1.0]), context, list(LAYER_KEYS))
    return {
        k: LayerInfo(channels=int(v.shape[1]), stride=size // int(v.shape[-1]))
        for k, v in feats.items()
    }
