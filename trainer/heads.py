"""Timestep-conditioned projection heads (METHOD.md), one per feature key.

Each head maps the student's clean feature to what the teacher shows at timestep t. Every
residual branch ends in a zero-initialised projection and the norm modulation starts at
zero, so at initialisation each head is exactly the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

COND_DIM = 256
MAPPING_HIDDEN = 768
HEAD_LAYERS = 3
T_SCALE = 999.0


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    a, gate = x.chunk(2, dim=-1)
    return a * F.silu(gate)


def _zero(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class FourierFeatures(nn.Module):
    """Random Fourier features of a scalar; the frequencies are a saved buffer."""

    weight: torch.Tensor

    def __init__(self, out_features: int = COND_DIM, std: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("weight", torch.randn(out_features // 2, 1) * std)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # fp32 even under autocast: bf16 would round t * w (up to ~1e2 rad) by ~0.5 rad.
        with torch.autocast(t.device.type, enabled=False):
            f = 2 * math.pi * t[:, None].float() @ self.weight.float().T
            return torch.cat([f.cos(), f.sin()], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x) * self.scale


class MappingBlock(nn.Module):
    """x + W_down(SwiGLU(W_up(RMSNorm(x)))), zero-initialised output."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = _zero(nn.Linear(hidden, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(swiglu(self.up(self.norm(x))))


class TimestepConditioning(nn.Module):
    """t -> c (256-d): MappingNetwork(Linear(FourierFeatures(t / 999)))."""

    def __init__(self, dim: int = COND_DIM, hidden: int = MAPPING_HIDDEN) -> None:
        super().__init__()
        self.fourier = FourierFeatures(dim)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm_in = RMSNorm(dim)
        self.blocks = nn.Sequential(MappingBlock(dim, hidden), MappingBlock(dim, hidden))
        self.norm_out = RMSNorm(dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.fourier(t / T_SCALE))
        return self.norm_out(self.blocks(self.norm_in(x)))


class AdaRMSNorm(nn.Module):
    """rms_norm(x) * (1 + W_c c), W_c zero-initialised."""

    def __init__(self, dim: int, cond_dim: int = COND_DIM) -> None:
        super().__init__()
        self.modulation = _zero(nn.Linear(cond_dim, dim, bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return rms_norm(x) * (1 + self.modulation(c)[:, None, None, :])


class HeadLayer(nn.Module):
    """x + W_down(SwiGLU(W_up(AdaRMSNorm(x, c)))), per spatial token."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = AdaRMSNorm(dim)
        self.up = nn.Linear(dim, 2 * dim, bias=False)
        self.down = _zero(nn.Linear(dim, dim, bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x + self.down(swiglu(self.up(self.norm(x, c))))


class ProjectionHead(nn.Module):
    def __init__(self, dim: int, layers: int = HEAD_LAYERS) -> None:
        super().__init__()
        self.layers = nn.ModuleList(HeadLayer(dim) for _ in range(layers))

    def forward(self, feature: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """feature [N, C, h, w], c [N, 256] -> [N, C, h, w]."""
        x = feature.permute(0, 2, 3, 1)
        for layer in self.layers:
            x = layer(x, c)
        return x.permute(0, 3, 1, 2)


class Heads(nn.Module):
    """The 11 heads and the timestep conditioning they share."""

    def __init__(self, channels: dict[str, int]) -> None:
        super().__init__()
        self.conditioning = TimestepConditioning()
        self.heads = nn.ModuleDict({key: ProjectionHead(dim) for key, dim in channels.items()})

    def forward(self, features: dict[str, torch.Tensor], t: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        c = self.conditioning(t)
        return {key: self.heads[key](value, c) for key, value in features.items()}
