"""Encode worker results in the format the client negotiated (JSON, safetensors, npy)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from fastapi.responses import JSONResponse, Response
from safetensors.numpy import save as safetensors_bytes

from ..messages import Result
from .problems import Problem

SAFETENSORS = "application/x-safetensors"
NPY = "application/x-npy"
FORMATS = {"json": "application/json", "safetensors": SAFETENSORS, "npy": NPY}


def negotiate(format_param: str | None, accept: str | None) -> str:
    """`format=` wins; then the first Accept type we serve; JSON by default."""
    if format_param is not None:
        if format_param not in FORMATS:
            raise Problem(422, f"format must be one of {sorted(FORMATS)}")
        return format_param
    for part in (accept or "").split(","):
        media = part.split(";")[0].strip().lower()
        for name, served in FORMATS.items():
            if media == served:
                return name
    return "json"


def features_response(result: Result, fmt: str, image_size: tuple[int, int],
                      input_size: int) -> Response:
    meta = result.meta
    if fmt == "safetensors":
        metadata = {
            "model": meta.model, "model_version": meta.model_version,
            "image_width": str(image_size[0]), "image_height": str(image_size[1]),
            "input_size": str(input_size),
        }
        arrays = {key: result.array(key) for key in meta.layers}
        return Response(safetensors_bytes(arrays, metadata=metadata), media_type=SAFETENSORS,
                        headers=_version_headers(result))
    if fmt == "npy":  # the route checked that exactly one layer was asked
        buf = io.BytesIO()
        np.save(buf, result.array(next(iter(meta.layers))))
        return Response(buf.getvalue(), media_type=NPY, headers=_version_headers(result))
    return Response(features_json(result, image_size, input_size), media_type="application/json",
                    headers=_version_headers(result))


def features_json(result: Result, image_size: tuple[int, int], input_size: int) -> bytes:
    """The JSON body, with each layer's base64 spliced in as bytes.

    Base64 is plain ASCII that JSON never escapes, so the megabytes of feature data skip
    json.dumps entirely (it would scan every character); only the small fields go through it.
    """
    meta = result.meta
    head = json.dumps({
        "model": meta.model,
        "model_version": meta.model_version,
        "image": {"width": image_size[0], "height": image_size[1]},
        "input_size": input_size,
        "timings_ms": meta.timings_ms,
    }, separators=(",", ":"))
    parts = []
    for key, info in meta.layers.items():
        head_of_map = json.dumps({"shape": info.shape, "dtype": info.dtype},
                                 separators=(",", ":"))
        parts.append(b"%s:%s,\"data\":\"%s\"}" % (json.dumps(key).encode(),
                                                head_of_map[:-1].encode(),
                                                base64.b64encode(result.data[key])))
    return head[:-1].encode() + b',"features":{' + b",".join(parts) + b"}}"


def correspond_response(result: Result) -> JSONResponse:
    meta = result.meta
    body: dict[str, object] = {
        "model": meta.model,
        "model_version": meta.model_version,
        "matches": meta.matches or [],
        "timings_ms": meta.timings_ms,
    }
    if meta.heatmap is not None:
        body["heatmap"] = meta.heatmap.model_dump()
    return JSONResponse(body, headers=_version_headers(result))


def _version_headers(result: Result) -> dict[str, str]:
    """Binary formats have no body field for these, so every format gets them as headers."""
    headers = {"X-Model-Version": result.meta.model_version}
    headers.update({f"X-Timing-{k.title()}-Ms": f"{v:.3f}"
                    for k, v in result.meta.timings_ms.items()})
    return headers
