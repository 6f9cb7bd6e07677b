"""HTTP routes: thin glue between parsing, the broker and response encoding."""

from __future__ import annotations

import hmac
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel

from cleandift.settings import Settings

from . import openapi, parsing, responses
from .broker import Broker, DeadlineExceeded, QueueFull, QueueUnavailable
from .metrics import ApiMetrics
from .problems import Problem
from .protocol import Job, Result

router = APIRouter()
STATIC_DIR = Path(__file__).parent / "static"


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_broker(request: Request) -> Broker:
    return request.app.state.broker


def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
BrokerDep = Annotated[Broker, Depends(get_broker)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """Bearer token or X-API-Key, only when a key is configured."""
    if not settings.api_key:
        return
    given = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not given or not hmac.compare_digest(given.encode(), settings.api_key.encode()):
        raise Problem(401, "missing or wrong API key (Authorization: Bearer KEY or X-API-Key)",
                      headers={"WWW-Authenticate": "Bearer"})


Protected = [Depends(require_api_key)]
RETRY = {"Retry-After": "1"}  # 429 and 503: worth retrying after a second


class FeatureMap(BaseModel):
    shape: list[int]
    dtype: str
    data: str


class FeaturesOut(BaseModel):
    model: str
    model_version: str
    image: dict[str, int]
    input_size: int
    features: dict[str, FeatureMap]
    timings_ms: dict[str, float]


class MatchOut(BaseModel):
    source: list[float]
    target: list[float]
    score: float


class HeatmapOut(BaseModel):
    width: int
    height: int
    values: list[float]  # row-major cosine similarities, height x width


class CorrespondOut(BaseModel):
    model: str
    model_version: str
    matches: list[MatchOut]
    timings_ms: dict[str, float]
    heatmap: HeatmapOut | None = None


async def served_model(broker: Broker) -> dict:
    try:
        model = await broker.model_info()
    except Exception as exc:
        raise Problem(503, f"the queue is unreachable: {exc}", kind="not-ready",
                      headers=RETRY) from exc
    if model is None:
        raise Problem(503, "no worker has loaded a model yet", kind="not-ready", headers=RETRY)
    return model


async def run(broker: Broker, job: Job) -> Result:
    """Submit and map queue outcomes to HTTP problems."""
    start = time.perf_counter()
    try:
        result = await broker.submit(job)
    except QueueFull as exc:
        raise Problem(429, "the queue is full; retry later", kind="overloaded",
                      headers=RETRY) from exc
    except QueueUnavailable as exc:
        raise Problem(503, f"the queue is unreachable: {exc}", kind="not-ready",
                      headers=RETRY) from exc
    except DeadlineExceeded as exc:
        raise Problem(504, "no worker answered before the deadline", kind="deadline") from exc
    if result.status != 200:
        raise Problem(result.status, result.error)
    result.timings_ms["total"] = round((time.perf_counter() - start) * 1000, 3)
    return result


@router.post(
    "/features",
    dependencies=Protected,
    response_model=FeaturesOut,
    responses={200: {"content": openapi.BINARY_FEATURES},
               **openapi.errors(400, 401, 413, 415, 422, 429, 503, 504)},
    openapi_extra=openapi.FEATURES_BODY,
    summary="Per-layer feature maps of one image",
)
async def features(
    request: Request,
    settings: SettingsDep,
    broker: BrokerDep,
    format: Annotated[Literal["json", "safetensors", "npy"] | None,
                      Query(description="the answer's format; else the Accept header")] = None,
    dtype: Annotated[Literal["float16", "float32"] | None,
                     Query(description="float16 (default) or float32")] = None,
) -> Response:
    fmt = responses.negotiate(format, request.headers.get("accept"))
    model = await served_model(broker)
    job = await parsing.features_job(request, settings, model)
    if fmt == "npy" and len(job.spec.layers) != 1:
        raise Problem(422, f"npy holds exactly one layer; {len(job.spec.layers)} were asked")
    result = await run(broker, job)
    return responses.features_response(result, fmt, job.spec.sizes[0], job.spec.size)


@router.post(
    "/correspond",
    dependencies=Protected,
    response_model=CorrespondOut,
    responses=openapi.errors(400, 401, 413, 415, 422, 429, 503, 504),
    openapi_extra=openapi.CORRESPOND_BODY,
    summary="Matches from a source image to a target image",
)
async def correspond(request: Request, settings: SettingsDep, broker: BrokerDep) -> Response:
    model = await served_model(broker)
    job = await parsing.correspond_job(request, settings, model)
    return responses.correspond_response(await run(broker, job))


@router.get("/v1/models", dependencies=Protected, responses=openapi.errors(401, 503))
async def models(broker: BrokerDep) -> dict:
    """The served model; during a reload, the version most recently loaded by a worker."""
    return await served_model(broker)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The correspondence page (assets under /static, served by this service)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", responses=openapi.errors(503))
async def readyz(broker: BrokerDep) -> JSONResponse:
    if not await broker.ping():
        raise Problem(503, "the queue (Redis) is unreachable", kind="not-ready")
    workers = await broker.live_workers()
    if not workers:
        raise Problem(503, "no worker has sent a heartbeat recently", kind="not-ready")
    model = await broker.model_info()
    if model is None:
        raise Problem(503, "no model is loaded", kind="not-ready")
    return JSONResponse({"status": "ready", "workers": len(workers),
                         "model": model["name"], "model_version": model["version"]})


@router.get("/metrics", include_in_schema=False)
async def metrics(broker: BrokerDep, api_metrics: MetricsDep) -> Response:
    try:
        depth, pending = await broker.queue_state()
        api_metrics.queue_depth.set(depth)
        api_metrics.queue_pending.set(pending)
        api_metrics.workers_alive.set(len(await broker.live_workers()))
        api_metrics.worker_snapshots = await broker.worker_snapshots()
        model = await broker.model_info()
        api_metrics.model_info.clear()
        if model:
            api_metrics.model_info.labels(name=model["name"], version=model["version"]).set(1)
    except Exception:  # metrics stay available while Redis is down
        api_metrics.workers_alive.set(0)
    return Response(api_metrics.render(), media_type="text/plain; version=0.0.4")
