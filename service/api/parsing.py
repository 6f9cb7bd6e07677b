"""Turn an HTTP request into a validated Job; every failure is a 4xx Problem.

Images are decoded and resized here, in the API process, so a bad file never reaches a
worker and workers receive exactly the model-sized pixels they need.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request

from cleandift.contract import (
    ModelInfo,
    RequestError,
    check_size,
    validate_layers,
    validate_points,
)
from cleandift.images import ImageError, decode_image, resize_rgb
from cleandift.settings import Settings

from ..messages import Job, JobSpec
from .problems import Problem, describe_validation


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int | None = Field(None, description="Model input side in px, a multiple of 64.")
    prompt: str = Field("", description="Text conditioning; empty by default.")
    mode: Literal["clean", "dift"] = Field(
        "clean", description="clean: one pass (CleanDIFT); dift: the 8-sample noisy baseline."
    )


class FeaturesParams(_Params):
    layers: list[str] | None = Field(None, description="Feature keys; the model's default.")
    dtype: Literal["float16", "float32"] = "float16"


class FeaturesBody(FeaturesParams):
    image: str = Field(description="The image file, base64-encoded.")


class CorrespondParams(_Params):
    points: Any = Field(None, description="[[x, y], ...] in source pixels; mutual NN if absent.")
    layer: str | None = Field(None, description="Feature key; the model's correspondence layer.")
    max_matches: int | None = Field(None, ge=1, description="Mutual matches returned at most.")
    heatmap: bool = Field(False, description="Also return the last point's cosine similarity "
                          "over the target, at feature resolution.")


class CorrespondBody(CorrespondParams):
    source: str = Field(description="Source image, base64-encoded.")
    target: str = Field(description="Target image, base64-encoded.")


async def read_payload(request: Request, files: tuple[str, ...]) -> tuple[dict, dict[str, bytes]]:
    """(fields, file bytes) from a multipart form or a JSON body with base64 files."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=len(files), max_fields=32)
        fields: dict[str, str] = {}
        blobs: dict[str, bytes] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in files:
                    raise Problem(422, f"unexpected file field {name!r}")
                blobs.setdefault(name, await value.read())
            else:
                fields[name] = value
        return _coerce_form(fields), blobs
    if content_type == "application/json":
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Problem(400, f"the body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise Problem(422, "the JSON body must be an object")
        blobs = {name: _b64(name, body.pop(name)) for name in files if name in body}
        return body, blobs
    raise Problem(415, "send multipart/form-data or application/json",
                  kind="unsupported-media-type")


def _coerce_form(fields: dict[str, str]) -> dict:
    """Form fields are strings: split layer lists and parse the points JSON."""
    out: dict[str, Any] = dict(fields)
    if "layers" in out:
        out["layers"] = [k.strip() for k in out["layers"].split(",") if k.strip()]
    if "points" in out:
        try:
            out["points"] = json.loads(out["points"])
        except json.JSONDecodeError as exc:
            raise Problem(422, f"points is not valid JSON: {exc}") from exc
    for name in ("size", "max_matches", "heatmap"):
        if out.get(name) == "":
            out.pop(name)
    return out


def _b64(name: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise Problem(422, f"{name} must be a base64 string")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Problem(400, f"{name} is not valid base64: {exc}") from exc


def validate(model: type[BaseModel], fields: dict) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise Problem(422, describe_validation(exc.errors())) from exc


async def decode(name: str, blobs: dict[str, bytes], settings: Settings) -> Image.Image:
    if name not in blobs:
        raise Problem(422, f"{name}: an image file is required")
    try:
        return await run_in_threadpool(
            decode_image, blobs[name], max_bytes=settings.max_body_bytes,
            max_pixels=settings.max_image_pixels,
        )
    except ImageError as exc:
        raise Problem(exc.status, f"{name}: {exc}") from exc


def input_size(params: _Params, model: ModelInfo, settings: Settings) -> int:
    """Size and prompt checks shared by both routes; returns the model input side."""
    if len(params.prompt) > settings.max_prompt_chars:
        raise RequestError(f"prompt has {len(params.prompt)} characters; the limit is "
                           f"{settings.max_prompt_chars}")
    return check_size(params.size or model.input_size, lo=settings.min_size, hi=settings.max_size)


async def features_job(request: Request, settings: Settings, model: ModelInfo,
                       query_dtype: str | None = None) -> Job:
    fields, blobs = await read_payload(request, ("image",))
    if query_dtype is not None:
        fields.setdefault("dtype", query_dtype)
    params = validate(FeaturesParams, fields)
    size = input_size(params, model, settings)
    layers = validate_layers(params.layers, model.default_layers)
    image = await decode("image", blobs, settings)
    pixels = await run_in_threadpool(resize_rgb, image, size)
    spec = JobSpec(kind="features", input_size=size, layers=layers, image_sizes=[image.size],
                   prompt=params.prompt, mode=params.mode, dtype=params.dtype,
                   deadline=time.time() + settings.request_timeout_s)
    return Job(spec=spec, images=[pixels])


async def correspond_job(request: Request, settings: Settings, model: ModelInfo) -> Job:
    fields, blobs = await read_payload(request, ("source", "target"))
    params = validate(CorrespondParams, fields)
    size = input_size(params, model, settings)
    layer = validate_layers([params.layer or model.correspondence_layer], [])
    if params.max_matches is not None and params.max_matches > settings.max_matches:
        raise RequestError(f"max_matches is at most {settings.max_matches}")
    source = await decode("source", blobs, settings)
    target = await decode("target", blobs, settings)
    points = None
    if params.points is not None:
        points = validate_points(params.points, source.size, settings.max_points)
    images = [await run_in_threadpool(resize_rgb, im, size) for im in (source, target)]
    spec = JobSpec(kind="correspond", input_size=size, layers=layer,
                   image_sizes=[source.size, target.size], prompt=params.prompt,
                   mode=params.mode, points=points,
                   max_matches=params.max_matches or settings.max_matches,
                   heatmap=params.heatmap, deadline=time.time() + settings.request_timeout_s)
    return Job(spec=spec, images=images)
