"""The dtype vocabulary, written once: the names users write (settings, the API's
`dtype`, `--out-dtype`), their sizes and codes on the wire, and the torch types they mean.

Torch is imported only to resolve a name, so the settings and the torch-free API use this
freely.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

FloatName = Literal["float16", "bfloat16", "float32"]  # what a model computes in
OutputName = Literal["float16", "bfloat16", "float32", "int8"]  # what an answer carries
FLOAT_NAMES: tuple[str, ...] = get_args(FloatName)
OUTPUT_NAMES: tuple[str, ...] = get_args(OutputName)
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "int8": 1}  # bytes per value
SAFETENSORS_CODES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "int8": "I8"}
NPY_DESCR = {"float16": "<f2", "float32": "<f4"}  # .npy has no bfloat16, int8 needs scales
ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
           "float": "float32"}


def canonical_dtype(name: str) -> str:
    """`fp16` -> `float16`; unknown names raise ValueError naming the valid ones."""
    name = ALIASES.get(name, name)
    if name not in FLOAT_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {list(FLOAT_NAMES)}")
    return name


def output_name(dtype: torch.dtype) -> str:
    """The wire name of a tensor's dtype (one of OUTPUT_NAMES)."""
    name = str(dtype).removeprefix("torch.")
    if name not in OUTPUT_NAMES:
        raise ValueError(f"{dtype} is not an output dtype ({list(OUTPUT_NAMES)})")
    return name


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(name, torch.dtype):
        return name
    dtype: torch.dtype = getattr(torch, canonical_dtype(name))
    return dtype
