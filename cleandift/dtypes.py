"""Names of floating-point types as users write them, and the torch types they mean.

Torch is imported only to resolve a name, so the settings (and the API) use this freely.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FLOAT_NAMES = ("float16", "bfloat16", "float32")
ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
           "float": "float32"}


def canonical_dtype(name: str) -> str:
    """`fp16` -> `float16`; unknown names raise ValueError naming the valid ones."""
    name = ALIASES.get(name, name)
    if name not in FLOAT_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {list(FLOAT_NAMES)}")
    return name


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(name, torch.dtype):
        return name
    dtype: torch.dtype = getattr(torch, canonical_dtype(name))
    return dtype
