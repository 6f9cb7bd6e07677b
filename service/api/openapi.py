"""OpenAPI documentation of the routes whose bodies are parsed by hand (multipart or JSON).

The schemas are derived from the same pydantic models that validate the requests, so the
documentation cannot drift from what is accepted.
"""

from __future__ import annotations

from pydantic import BaseModel

from .encoding import NPY, SAFETENSORS
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


def errors(*statuses: int) -> dict:
    content = {MEDIA_TYPE: {"schema": PROBLEM_SCHEMA}}
    return {status: {"description": "Problem details", "content": content} for status in statuses}


FEATURES_BODY = request_body(FeaturesBody, ("image",))
CORRESPOND_BODY = request_body(CorrespondBody, ("source", "target"))
BINARY_FEATURES = {
    SAFETENSORS: {"schema": _FILE},
    NPY: {"schema": _FILE},
}
