"""The byte formats of a features answer (JSON, safetensors, npy), produced as a stream.

The raw bytes of every layer (little-endian, C-order, concatenated in the order of the
result's `layers`) arrive either inline from Redis or streamed from the worker that holds
them; each format is a header, then those bytes as they arrive (base64 in JSON), then a
tail. Lengths are known up front, so every answer carries a Content-Length, and the API
never holds a whole multi-megabyte answer in memory. A leaf: which format, and what
goes in its header, is answers.py's to decide.
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import numpy as np

from cleandift.dtypes import NPY_DESCR, SAFETENSORS_CODES

from ..messages import ResultMeta

SAFETENSORS = "application/x-safetensors"
NPY = "application/x-npy"
FORMATS = {"json": "application/json", "safetensors": SAFETENSORS, "npy": NPY}
Raw = AsyncIterator[bytes | memoryview]


@dataclass
class Body:
    media_type: str
    length: int
    chunks: AsyncIterator[bytes | memoryview]


async def inline_raw(parts: Iterable[bytes | memoryview]) -> Raw:
    for part in parts:
        yield part


def encode(fmt: str, meta: ResultMeta, raw: Raw, *, metadata: dict[str, str],
           head: dict[str, object]) -> Body:
    """`metadata`: safetensors' string metadata; `head`: the JSON answer's other fields."""
    if fmt == "safetensors":
        return safetensors_body(meta, raw, metadata)
    if fmt == "npy":
        return npy_body(meta, raw)
    return json_body(meta, raw, head)


def safetensors_body(meta: ResultMeta, raw: Raw, metadata: dict[str, str]) -> Body:
    header: dict[str, object] = {}
    offset = 0
    for (key, info), size in zip(meta.layers.items(), meta.layer_sizes()):
        header[key] = {"dtype": SAFETENSORS_CODES[info.dtype], "shape": info.shape,
                       "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    prefix = struct.pack("<Q", len(text)) + text
    return Body(SAFETENSORS, len(prefix) + offset, _around(prefix, raw, b""))


def npy_body(meta: ResultMeta, raw: Raw) -> Body:
    """Exactly one layer of a dtype npy holds (answers.check_format refused the rest)."""
    [info] = meta.layers.values()
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": NPY_DESCR[info.dtype],
                                               "fortran_order": False,
                                               "shape": tuple(info.shape)})
    prefix = buf.getvalue()  # magic, version, header dict, padding
    return Body(NPY, len(prefix) + meta.layer_sizes()[0], _around(prefix, raw, b""))


def json_body(meta: ResultMeta, raw: Raw, head: dict[str, object]) -> Body:
    """The JSON answer with each layer's base64 streamed in place. Base64 is ASCII that
    JSON never escapes, so the megabytes skip json.dumps entirely."""
    opening = json.dumps(head, separators=(",", ":"))[:-1].encode() + b',"features":{'
    prefixes, suffix = [], b'"}'
    for i, (key, info) in enumerate(meta.layers.items()):
        layer = json.dumps({"shape": info.shape, "dtype": info.dtype}, separators=(",", ":"))
        prefixes.append((b"," if i else b"") + json.dumps(key).encode() + b":"
                        + layer[:-1].encode() + b',"data":"')
    sizes = meta.layer_sizes()
    length = (len(opening) + sum(map(len, prefixes)) + len(suffix) * len(sizes)
              + sum(4 * math.ceil(n / 3) for n in sizes) + 2)
    return Body("application/json", length,
                _json_chunks(opening, prefixes, suffix, sizes, raw))


async def _around(prefix: bytes, raw: Raw, tail: bytes) -> AsyncIterator[bytes | memoryview]:
    yield prefix
    async for chunk in raw:
        yield chunk
    if tail:
        yield tail


async def _json_chunks(opening: bytes, prefixes: list[bytes], suffix: bytes, sizes: list[int],
                       raw: Raw) -> AsyncIterator[bytes | memoryview]:
    yield opening
    for index, layer in enumerate(_layers(raw, sizes)):
        yield prefixes[index]
        carry = b""
        async for piece in layer:
            data = carry + bytes(piece) if carry else piece
            cut = len(data) - len(data) % 3  # base64 of 3-byte groups concatenates
            yield base64.b64encode(data[:cut])
            carry = bytes(data[cut:])
        yield base64.b64encode(carry) + suffix
    yield b"}}"


def _layers(raw: Raw, sizes: list[int]) -> list[AsyncIterator[bytes | memoryview]]:
    """The raw stream cut at layer boundaries: one iterator per layer, consumed in order."""
    state: dict[str, bytes | memoryview] = {"pending": b""}

    async def layer(size: int) -> AsyncIterator[bytes | memoryview]:
        left = size
        while left > 0:
            piece = state["pending"]
            if not piece:
                piece = await anext(raw)
            state["pending"], piece = piece[left:], piece[:left]
            left -= len(piece)
            yield piece

    return [layer(size) for size in sizes]
