"""OpenAPI documentation of the routes whose bodies are parsed by hand (multipart or JSON).

The schemas are derived from the same pydantic models that validate the requests, so the
documentation cannot drift from what is accepted.
"""

from __future__ import annotations

from pydantic import BaseModel

from .formats import NPY, SAFETENSORS
from .parsing import CorrespondBody, FeaturesBody
from .problems import MEDIA_TYPE, PROBLEM_SCHEMA

_FILE = {"type": "string", "format": "binary"}


def _json_schema(model: type[BaseModel]) -> dict:
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


def _multipart(model: type[BaseModel], files: tuple[str, ...]) -> dict:
    schema = _json_schema(model)
    props = dict(schema["properties"])
    for name in files:
        props[name] = {**_FILE, "description": props[name].get("description", "")}
    if "layers" in props:
        props["layers"] = {"type": "string", "description": "Comma-separated keys, e.g. us6,us9"}
    if "points" in props:
        props["points"] = {"type": "string", "description": "JSON list of [x, y] pixels"}
    if "targets" in props:  # a form repeats the `target` field instead
        del props["targets"]
        props["target"]["description"] = "Target image; repeat the field for several targets"
    return {"type": "object", "properties": props, "required": list(files)}


def request_body(model: type[BaseModel], files: tuple[str, ...]) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": _multipart(model, files)},
                "application/json": {"schema": _json_schema(model)},
            },
        }
    }


def _header(description: str, type_: str = "string") -> dict:
    return {"description": description, "schema": {"type": type_}}


HEADERS = {
    "X-Model-Version": _header("The version of the weights that computed this answer."),
    "ETag": _header("Weak validator of this answer (pixels, image size, model and version, "
                    "options, format): send it back in If-None-Match to skip a "
                    "recomputation."),
    "X-Cache": _header("hit: the features came from the feature cache; miss: computed."),
    "Retry-After": _header("Seconds to wait before retrying.", "integer"),
    "X-Request-ID": _header("The request's id (the client's X-Request-ID when it sent a "
                            "well-formed one): in every answer and every log line about it."),
    "X-Timing-Queue-Ms": _header("Milliseconds the job waited in the queue.", "number"),
    "X-Timing-Inference-Ms": _header("Milliseconds of the forward pass of the job's batch.",
                                     "number"),
    "X-Timing-Total-Ms": _header("Milliseconds from enqueuing to the answer.", "number"),
}
TIMING_HEADERS = ("X-Timing-Queue-Ms", "X-Timing-Inference-Ms", "X-Timing-Total-Ms")
_ERROR_HEADERS = {412: ("ETag",), 429: ("Retry-After",), 503: ("Retry-After",)}


def errors(*statuses: int) -> dict:
    content = {MEDIA_TYPE: {"schema": PROBLEM_SCHEMA}}
    return {status: {"description": "Problem details", "content": content,
                     "headers": {h: HEADERS[h] for h in ("X-Request-ID",
                                                         *_ERROR_HEADERS.get(status, ()))}}
            for status in statuses}


def success(*headers: str, content: dict | None = None) -> dict:
    """The 200 answer's documented headers (and extra media types); every answer of a
    job carries its stage timings."""
    out: dict = {"headers": {h: HEADERS[h] for h in ("X-Request-ID", *headers,
                                                     *TIMING_HEADERS)}}
    if content:
        out["content"] = content
    return {200: out}


FEATURES_BODY = request_body(FeaturesBody, ("image",))
CORRESPOND_BODY = request_body(CorrespondBody, ("source", "target"))
BINARY_FEATURES = {
    SAFETENSORS: {"schema": _FILE},
    NPY: {"schema": _FILE},
}
