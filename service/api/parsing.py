"""Turn an HTTP request into a validated Job; every failure is a 4xx problem.

Images are decoded and resized here, in the API process, so a bad file never reaches a
worker and workers receive exactly the model-sized pixels they need.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from cleandift.contract import ModelInfo, RequestError, check_size, validate_layers, validate_points
from cleandift.method import SIZE_MULTIPLE
from cleandift.settings import Settings

from ..messages import Job, JobSpec
from .decoding import MemoryBudget, decode_upload
from .payload import Blobs, Fields, loads, read_payload
from .problems import Problem, describe_validation

MAX_SIDE = 1 << 16  # far above any configurable max_size; keeps huge numbers out of messages


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int | None = Field(None, ge=SIZE_MULTIPLE, le=MAX_SIDE,
                             description="Model input side in px, a multiple of 64.")
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
    max_matches: int | None = Field(None, ge=1, le=MAX_SIDE,
                                    description="Mutual matches returned at most.")
    heatmap: bool = Field(False, description="Also return the last point's cosine similarity "
                          "over the target, at feature resolution.")


class CorrespondBody(CorrespondParams):
    source: str = Field(description="Source image, base64-encoded.")
    target: str = Field(description="Target image, base64-encoded.")


def _coerce_form(fields: Fields) -> Fields:
    """Form fields are strings: split layer lists and parse the points JSON."""
    out = dict(fields)
    if "layers" in out:
        out["layers"] = [k.strip() for k in str(out["layers"]).split(",") if k.strip()]
    if "points" in out:
        out["points"] = loads(out["points"], "points", status=422)
    for name in ("size", "max_matches", "heatmap"):
        if out.get(name) == "":
            out.pop(name)
    return out


def validate(model: type[BaseModel], fields: Fields) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise Problem(422, describe_validation(exc.errors())) from exc


async def _params(request: Request, model: type[BaseModel], files: tuple[str, ...]
                  ) -> tuple[Any, Blobs]:
    fields, blobs = await read_payload(request, files)
    if request.headers.get("content-type", "").startswith("multipart/"):
        fields = _coerce_form(fields)
    return validate(model, fields), blobs


def _one(blobs: Blobs, name: str) -> bytes:
    files = blobs.get(name)
    if not files:
        raise RequestError(f"{name}: an image file is required")
    if len(files) > 1:
        raise RequestError(f"{name}: one image file is expected, {len(files)} were sent")
    return files[0]


def input_size(params: _Params, model: ModelInfo, settings: Settings) -> int:
    """Size and prompt checks shared by both routes; returns the model input side."""
    if len(params.prompt) > settings.max_prompt_chars:
        raise RequestError(f"prompt has {len(params.prompt)} characters; the limit is "
                           f"{settings.max_prompt_chars}")
    try:
        params.prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate from a JSON "\\ud800" escape
        raise RequestError("prompt is not valid Unicode text") from exc
    size = params.size if params.size is not None else model.input_size
    return check_size(size, lo=settings.min_size, hi=settings.max_size)


async def features_job(request: Request, settings: Settings, model: ModelInfo,
                       budget: MemoryBudget, query_dtype: str | None = None) -> Job:
    params, blobs = await _params(request, FeaturesParams, ("image",))
    if query_dtype is not None and "dtype" not in params.model_fields_set:
        params = params.model_copy(update={"dtype": query_dtype})
    size = input_size(params, model, settings)
    layers = validate_layers(params.layers, model.default_layers)
    pixels, image_size = await decode_upload("image", _one(blobs, "image"), size, settings,
                                             budget)
    spec = JobSpec(kind="features", input_size=size, layers=layers, image_sizes=[image_size],
                   prompt=params.prompt, mode=params.mode, dtype=params.dtype,
                   deadline=time.time() + settings.request_timeout_s)
    return Job(spec=spec, images=[pixels])


async def correspond_job(request: Request, settings: Settings, model: ModelInfo,
                         budget: MemoryBudget) -> Job:
    params, blobs = await _params(request, CorrespondParams, ("source", "target"))
    size = input_size(params, model, settings)
    layer = validate_layers([params.layer or model.correspondence_layer], [])
    if params.max_matches is not None and params.max_matches > settings.max_matches:
        raise RequestError(f"max_matches is at most {settings.max_matches}")
    source, source_size = await decode_upload("source", _one(blobs, "source"), size, settings,
                                              budget)
    target, target_size = await decode_upload("target", _one(blobs, "target"), size, settings,
                                              budget)
    points = None
    if params.points is not None:
        points = validate_points(params.points, source_size, settings.max_points)
    spec = JobSpec(kind="correspond", input_size=size, layers=layer,
                   image_sizes=[source_size, target_size], prompt=params.prompt,
                   mode=params.mode, points=points,
                   max_matches=params.max_matches or settings.max_matches,
                   heatmap=params.heatmap, deadline=time.time() + settings.request_timeout_s)
    return Job(spec=spec, images=[source, target])
