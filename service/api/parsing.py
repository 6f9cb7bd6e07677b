"""Turn an HTTP request into a validated Job; every failure is a 4xx problem.

Images are decoded and resized here, in the API process, so a bad file never reaches a
worker and workers receive exactly the model-sized pixels they need.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.requests import Request

from cleandift.contract import (
    ModelInfo,
    RequestError,
    check_size,
    shown,
    validate_layers,
    validate_points,
)
from cleandift.cost import check_cost, request_cost
from cleandift.dtypes import OutputName
from cleandift.method import SIZE_MULTIPLE
from cleandift.settings import Settings

from ..messages import Job, JobSpec
from .decoding import MemoryBudget, Upload, take_upload
from .payload import Blobs, Fields, loads, read_payload
from .problems import Problem, describe_validation

MAX_SIDE = 1 << 16  # far above any configurable max_size; keeps huge numbers out of messages


def _not_bool(value: object) -> object:
    if isinstance(value, bool):  # pydantic would take JSON true for 1
        raise ValueError("must be an integer, not true or false")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: Int | None = Field(None, ge=SIZE_MULTIPLE, le=MAX_SIDE,
                             description="Model input side in px, a multiple of 64.")
    prompt: str = Field("", description="Text conditioning; empty by default.")
    mode: Literal["clean", "dift"] = Field(
        "clean", description="clean: one pass (CleanDIFT); dift: the 8-sample noisy baseline."
    )
    model: str | None = Field(None, max_length=200, description="A served model's name "
                              "(GET /v1/models lists them); the deployment's default if absent.")


class FeaturesParams(_Params):
    layers: list[str] | None = Field(None, description="Feature keys; the model's default.")
    dtype: OutputName = Field(
        "float16", description="Values of the answer; int8 comes with a float32 scale per "
        "channel, as the tensor KEY.scale (value = int8 * scale).")
    points: Any = Field(None, description="[[x, y], ...] in pixels of the image: each layer "
                        "answers [N, C] descriptors at these points instead of its map.")
    grid: Int | None = Field(None, ge=1, le=MAX_SIDE, description="Pool each map to grid x "
                             "grid cells (mean over each cell's region): [C, grid, grid].")


class FeaturesBody(FeaturesParams):
    image: str = Field(description="The image file, base64-encoded.")


class CorrespondParams(_Params):
    points: Any = Field(None, description="[[x, y], ...] in source pixels; mutual NN if absent.")
    layer: str | None = Field(None, description="Feature key; the model's correspondence layer.")
    max_matches: Int | None = Field(None, ge=1, le=MAX_SIDE,
                                    description="Mutual matches returned at most.")
    heatmap: bool = Field(False, description="Also return the last point's cosine similarity "
                          "over the target, at feature resolution.")


class CorrespondBody(CorrespondParams):
    source: str = Field(description="Source image, base64-encoded.")
    target: str | None = Field(None, description="Target image, base64-encoded.")
    targets: list[str] | None = Field(None, description="Several targets, base64-encoded: the "
                                      "source is computed once; the answer has `results`.")


def _coerce_form(fields: Fields) -> Fields:
    """Form fields are strings: split layer lists and parse the points JSON."""
    out = dict(fields)
    if "layers" in out:
        out["layers"] = [k.strip() for k in str(out["layers"]).split(",") if k.strip()]
    if "points" in out:
        out["points"] = loads(out["points"], "points", status=422)
    for name in ("size", "max_matches", "heatmap", "grid"):
        if out.get(name) == "":
            out.pop(name)
    return out


def validate(model: type[BaseModel], fields: Fields) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise Problem(422, describe_validation(exc.errors())) from exc


async def _params(request: Request, model: type[BaseModel], files: tuple[str, ...],
                  max_files: int | None = None) -> tuple[Any, Blobs]:
    fields, blobs = await read_payload(request, files, max_files)
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


def model_name(params: _Params, query: str | None) -> str | None:
    """The model a request names, in its body or its query (not two different ones)."""
    if params.model and query and params.model != query:
        raise RequestError(f"the body names model {shown(params.model)} and the query "
                           f"{shown(query)}; name one")
    return params.model or query or None


async def read_features(request: Request, query_dtype: str | None = None
                        ) -> tuple[FeaturesParams, Blobs]:
    """The parameters and files of a /features request, checked alone (before the model
    they name is known)."""
    params, blobs = await _params(request, FeaturesParams, ("image",))
    if query_dtype is not None and "dtype" not in params.model_fields_set:
        params = params.model_copy(update={"dtype": query_dtype})
    return params, blobs


async def features_job(params: FeaturesParams, blobs: Blobs, settings: Settings,
                       model: ModelInfo, budget: MemoryBudget, *, decode: bool = True) -> Job:
    """`decode`: the API makes the pixels (else the worker does, from the upload)."""
    size = input_size(params, model, settings)
    layers = validate_layers(params.layers, model.default_layers)
    _check_grid(params, layers, model, size)
    within_ceiling("features", params.mode, size, layers, 1, params.points, model, settings)
    image = await take_upload("image", _one(blobs, "image"), size, settings, budget,
                              decode=decode)
    points = None
    if params.points is not None:
        points = validate_points(params.points, image.size, settings.max_points)
    spec = JobSpec(kind="features", input_size=size, layers=layers, image_sizes=[image.size],
                   prompt=params.prompt, mode=params.mode, dtype=params.dtype, points=points,
                   grid=params.grid, content=[image.content],
                   deadline=time.time() + settings.request_timeout_s)
    return _job(spec, [image])


def within_ceiling(kind: str, mode: str, size: int, layers: list[str], images: int,
                   points: list | None, model: ModelInfo, settings: Settings) -> None:
    """Refuse (422) what would hold a worker too long, before any image is decoded: the
    cost model of cleandift/cost.py against limits.max_job_cost. (Points over the limit
    are counted at the limit: their own check says so, after decoding.)"""
    layer = model.layers.get(layers[0]) if kind == "correspond" else None
    count = min(len(points), settings.max_points) if points is not None else 0
    cost = request_cost(kind=kind, mode=mode, size=size, layers=layers, images=images,
                        points=count, stride=layer.stride if layer else 0)
    check_cost(cost, settings.max_job_cost)


def _check_grid(params: FeaturesParams, layers: list[str], model: ModelInfo, size: int) -> None:
    if params.grid is None:
        return
    if params.points is not None:
        raise RequestError("ask for points or for a grid, not both")
    smallest = min(size // model.layers[key].stride for key in layers)
    if params.grid > smallest:
        raise RequestError(f"grid is at most {smallest} for these layers at size {size} "
                           "(their smallest map side)")


async def read_correspond(request: Request, settings: Settings
                          ) -> tuple[CorrespondParams, Blobs]:
    return await _params(request, CorrespondParams, ("source", "target", "targets"),
                         max_files=1 + settings.max_targets)


async def correspond_job(params: CorrespondParams, blobs: Blobs, settings: Settings,
                         model: ModelInfo, budget: MemoryBudget, *, decode: bool = True
                         ) -> Job:
    size = input_size(params, model, settings)
    layer = validate_layers([params.layer or model.correspondence_layer], [])
    if params.max_matches is not None and params.max_matches > settings.max_matches:
        raise RequestError(f"max_matches is at most {settings.max_matches}")
    targets = blobs.get("target", []) + blobs.get("targets", [])
    if not targets:
        raise RequestError("target: an image file is required (or several, as targets)")
    if len(targets) > settings.max_targets:
        raise RequestError(f"{len(targets)} targets; at most {settings.max_targets}")
    within_ceiling("correspond", params.mode, size, layer, 1 + len(targets), params.points,
                   model, settings)
    images = [await take_upload("source", _one(blobs, "source"), size, settings, budget,
                                decode=decode)]
    for i, data in enumerate(targets):
        images.append(await take_upload(f"target {i}" if len(targets) > 1 else "target",
                                        data, size, settings, budget, decode=decode))
    points = None
    if params.points is not None:
        points = validate_points(params.points, images[0].size, settings.max_points)
    spec = JobSpec(kind="correspond", input_size=size, layers=layer,
                   image_sizes=[im.size for im in images], prompt=params.prompt,
                   mode=params.mode, points=points,
                   max_matches=params.max_matches or settings.max_matches,
                   heatmap=params.heatmap, content=[im.content for im in images],
                   deadline=time.time() + settings.request_timeout_s)
    return _job(spec, images)


def _job(spec: JobSpec, uploads: list[Upload]) -> Job:
    """Pixels where the API decoded, the uploads as sent where a worker will."""
    if all(upload.pixels is not None for upload in uploads):
        return Job(spec=spec, images=[upload.pixels for upload in uploads
                                      if upload.pixels is not None])
    return Job(spec=spec, images=[], uploads=[upload.data or b"" for upload in uploads])
