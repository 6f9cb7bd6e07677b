"""Reading safetensors answers without copying: each array is a view into the received
bytes (the header says where each tensor lies), so a 35 MB answer is parsed in
microseconds. Little-endian hosts only, like the format itself.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

NUMPY_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "i1", "U8": "u1",
                "I16": "<i2", "I32": "<i4", "I64": "<i8", "BF16": "<u2"}  # BF16: raw bits


def read_safetensors(data: bytes | bytearray | memoryview | np.ndarray
                     ) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """(arrays as views into `data`, `__metadata__`, each tensor's safetensors dtype).

    BF16 tensors come back as their raw 16-bit patterns (numpy has no bfloat16); see
    `bfloat16_to_float32`.
    """
    buffer = np.frombuffer(data, dtype=np.uint8)
    (length,) = struct.unpack("<Q", buffer[:8].tobytes())
    header: dict[str, Any] = json.loads(buffer[8:8 + length].tobytes())
    metadata = header.pop("__metadata__", {}) or {}
    start = 8 + length
    arrays, dtypes = {}, {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = np.dtype(NUMPY_DTYPES[info["dtype"]])
        count = math.prod(info["shape"])
        if end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {name}: {end - begin} bytes for shape {info['shape']}")
        arrays[name] = np.frombuffer(buffer, dtype, count, start + begin).reshape(info["shape"])
        dtypes[name] = info["dtype"]
    return arrays, metadata, dtypes


def dequantize_int8(quantized: np.ndarray, scale: np.ndarray, channel_axis: int) -> np.ndarray:
    """int8 values and their per-channel scales (`KEY`, `KEY.scale`) -> float32."""
    shape = [1] * quantized.ndim
    shape[channel_axis] = -1
    return quantized.astype(np.float32) * scale.astype(np.float32).reshape(shape)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: widen the raw bits."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
