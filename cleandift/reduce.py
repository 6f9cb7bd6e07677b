"""Smaller answers than whole feature maps: descriptors at points, maps pooled to a grid,
and int8 values with per-channel scales. They run where the features are (the GPU in a
worker), before anything is copied to the host.

- points: `[N, C]`, the map read at pixel points of the original image with the same
  bilinear sampling as /correspond (DIFT's upsampled map at those pixels).
- grid: `[C, g, g]`, each cell the mean of the map over its region (adaptive pooling).
- int8: symmetric, one scale per channel: value = int8 * scale[c]; the scales travel as a
  float32 tensor named `KEY.scale` (`cleandift.client.tensors.dequantize_int8` undoes it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .contract import SCALE_SUFFIX
from .matching import sample_points

INT8_MAX = 127
__all__ = ["SCALE_SUFFIX", "at_points", "pooled", "quantize_int8"]


def at_points(feat: torch.Tensor, points: list[tuple[float, float]] | list[list[float]],
              image_size: tuple[int, int]) -> torch.Tensor:
    """[C, h, w] -> [N, C] at pixel points (x, y) of an image of size (W, H)."""
    return sample_points(feat, torch.as_tensor(points, dtype=torch.float32), image_size)


def pooled(feat: torch.Tensor, grid: int) -> torch.Tensor:
    """[C, h, w] -> [C, grid, grid] (grid <= h, w: the caller checked)."""
    return F.adaptive_avg_pool2d(feat[None].float(), grid)[0]


def quantize_int8(values: torch.Tensor, channel_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per channel) with value ~= int8 * scale."""
    values = values.float()
    others = [d for d in range(values.dim()) if d != channel_axis]
    peak = values.abs().amax(dim=others, keepdim=True).clamp_min(1e-12)
    scale = peak / INT8_MAX
    quantized = torch.round(values / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized, scale.flatten()

