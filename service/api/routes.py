"""HTTP routes: thin glue. parsing.py turns a request into a job, answers.py turns the
job into its answer; each route reads top to bottom as that walk.

Errors are raised, not handled, here: request-rule errors, queue errors and problems are
each mapped to their status once, in problems.py.
"""

from __future__ import annotations

import pathlib
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse, Response

from cleandift.contract import ModelInfo
from cleandift.dtypes import OutputName

from .. import tracing
from ..metrics import CONTENT_TYPE, QueueState, merge_worker_snapshots
from ..queue.errors import QueueUnavailable
from ..queue.partitions import Producer
from . import answers, openapi, parsing
from .deps import Protected, Services, ServicesDep
from .problems import RETRY, Problem
from .schemas import (
    CorrespondOut,
    FeaturesOut,
    HealthOut,
    Limits,
    ModelOut,
    ModelsOut,
    ReadyOut,
)

router = APIRouter()
STATIC_DIR = pathlib.Path(__file__).parent / "static"


ModelQuery = Annotated[str | None, Query(max_length=200, description="A served model's "
                                         "name; the deployment's default if absent.")]


async def pick(request: Request, services: Services, params: Any, query: str | None, *,
               fresh: bool = False) -> tuple[Producer, ModelInfo]:
    """The named model's queue and what it serves; refuse at once (404 unknown, 503 no
    worker, 429 full) before any image is decoded."""
    producer, name = await services.models.choose(parsing.model_name(params, query))
    request.state.model = name or ""  # the metrics' label (only served names)
    await producer.admit()  # no worker: 503 at once, and a call for workers
    info = await services.models.info(producer, fresh=fresh)
    request.state.model = info.name
    tracing.annotate(**{"cleandift.model": info.name, "cleandift.model_version": info.version})
    return producer, info


async def admit_early(request: Request, services: Services, query: str | None) -> None:
    """Refuse at once (404 unknown, 503 no worker, 429 full) before an upload is read,
    when the model is known without the body: named in the query, or the only one."""
    if query is None and len(services.models.producers) > 1:
        return  # the body may name it: `pick` decides once it is read
    producer, name = await services.models.choose(query)
    request.state.model = name or ""
    await producer.admit()


@router.post(
    "/features",
    dependencies=Protected,
    response_model=FeaturesOut,
    responses={**openapi.success("X-Model-Version", "ETag", "X-Cache",
                                 content=openapi.BINARY_FEATURES),
               **openapi.errors(400, 401, 404, 412, 413, 415, 422, 429, 503, 504)},
    openapi_extra=openapi.FEATURES_BODY,
    summary="Per-layer feature maps of one image",
    operation_id="features",
)
async def features(
    request: Request,
    services: ServicesDep,
    format: Annotated[Literal["json", "safetensors", "npy"] | None,
                      Query(description="the answer's format; else the Accept header")] = None,
    dtype: Annotated[OutputName | None,
                     Query(description="float16 (default), bfloat16, float32 or int8 (with "
                           "per-channel scales)")] = None,
    model: ModelQuery = None,
) -> Response:
    fmt = answers.negotiate(format, request.headers.get("accept"))
    await admit_early(request, services, model)
    with tracing.span("parse"):
        params, blobs = await parsing.read_features(request, dtype)
        # A conditional request is answered from the version in Redis, never a cached one.
        producer, info = await pick(request, services, params, model,
                                    fresh="if-none-match" in request.headers)
        job = await parsing.features_job(params, blobs, services.settings, info,
                                         services.budget, decode=producer.decode_here(
                                             services.settings.decode_at))
    services.metrics.count_layers("features", job.spec.layers)
    services.metrics.count_job(bool(job.uploads), job.image_bytes)
    answers.check_format(fmt, job.spec)
    etag = answers.answer_etag(job.spec, info.name, info.version, fmt)
    answers.check_not_modified(request.headers, etag)
    result, raw = await answers.obtain(producer, services.fetcher, job,
                                       gone=request.is_disconnected)
    with tracing.span("respond"):
        return answers.features_answer(result, raw, fmt, job.spec)


@router.post(
    "/correspond",
    dependencies=Protected,
    response_model=CorrespondOut,
    responses={**openapi.success("X-Model-Version", "X-Cache"),
               **openapi.errors(400, 401, 404, 413, 415, 422, 429, 503, 504)},
    openapi_extra=openapi.CORRESPOND_BODY,
    summary="Matches from a source image to a target image",
    operation_id="correspond",
)
async def correspond(request: Request, services: ServicesDep, model: ModelQuery = None
                     ) -> Response:
    await admit_early(request, services, model)
    with tracing.span("parse"):
        params, blobs = await parsing.read_correspond(request, services.settings)
        producer, info = await pick(request, services, params, model)
        job = await parsing.correspond_job(params, blobs, services.settings, info,
                                           services.budget, decode=producer.decode_here(
                                               services.settings.decode_at))
    services.metrics.count_layers("correspond", job.spec.layers)
    services.metrics.count_job(bool(job.uploads), job.image_bytes)
    result, _ = await answers.obtain(producer, services.fetcher, job,
                                     gone=request.is_disconnected)
    with tracing.span("respond"):
        return answers.correspond_answer(result)


@router.get("/v1/models", dependencies=Protected, response_model=ModelsOut,
            responses=openapi.errors(401, 503), operation_id="models")
async def models(services: ServicesDep) -> ModelsOut:
    """The default model (during a reload, the version most recently loaded by a worker)
    and the limits of one request, at the top level; every served model in `models`."""
    served = services.models
    default = await served.info(served.main, fresh=True)
    infos = [default if producer is served.main else await producer.model_info(fresh=True)
             for producer in served.producers.values()]
    return ModelsOut(**default.model_dump(), limits=Limits.of(services.settings),
                     default_model=default.name,
                     models=[info for info in infos if info is not None],
                     served=served.names or [default.name])


@router.get("/v1/models/{name}", dependencies=Protected, response_model=ModelOut,
            responses=openapi.errors(401, 404, 503), operation_id="model")
async def one_model(name: Annotated[str, Path(max_length=200)], services: ServicesDep,
                    request: Request) -> ModelOut:
    """One served model, by the name requests choose it with."""
    producer, served = await services.models.choose(name)
    request.state.model = served or ""  # the metrics' label (only served names)
    info = await services.models.info(producer, fresh=True)
    return ModelOut(**info.model_dump(), limits=Limits.of(services.settings))


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The correspondence page (assets under /static, served by this service)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/healthz", response_model=HealthOut, operation_id="healthz")
async def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/readyz/api", response_model=HealthOut, responses=openapi.errors(503),
            operation_id="readyz_api")
async def readyz_api(services: ServicesDep) -> HealthOut:
    """This API process can take requests: its queue (Redis) answers. Workers may be
    scaled to zero meanwhile (requests then get 503 with Retry-After and wake them): the
    readiness probe of API pods, where /readyz would take every pod out of the Service."""
    if not await services.producer.ping():
        raise Problem(503, "the queue (Redis) is unreachable", kind="not-ready", headers=RETRY)
    return HealthOut(status="ok")


@router.get("/readyz", response_model=ReadyOut, responses=openapi.errors(503),
            operation_id="readyz")
async def readyz(services: ServicesDep) -> ReadyOut:
    """Ready when every served model has a live worker with the model loaded."""
    if not await services.producer.ping():
        raise Problem(503, "the queue (Redis) is unreachable", kind="not-ready")
    workers, versions = 0, {}
    for name, producer in services.models.producers.items():
        label = f"model {name}: " if name else ""
        live = await producer.live_workers()
        if not live:
            raise Problem(503, f"{label}no worker has sent a heartbeat recently",
                          kind="not-ready")
        model = await producer.model_info()
        if model is None:
            raise Problem(503, f"{label}no model is loaded", kind="not-ready")
        workers += len(live)
        versions[model.name] = model.version
    default = await services.models.info(services.producer)
    return ReadyOut(status="ready", workers=workers, model=default.name,
                    model_version=default.version, models=versions)


@router.get("/metrics", include_in_schema=False)
async def metrics(services: ServicesDep) -> Response:
    """This replica's API metrics (all its processes) and each model's queue as Redis
    sees it."""
    states = []
    for name, producer in services.models.producers.items():
        state = QueueState(served=name or "")
        try:
            state.depth, state.pending = await producer.queue_state()
            state.workers_alive = len(await producer.live_workers())
            model = await producer.model_info()
            state.model = (model.name, model.version) if model else None
            state.served = state.served or (model.name if model else "")
        except QueueUnavailable:  # metrics stay available while Redis is down
            pass
        states.append(state)
    return Response(services.metrics.render(states), media_type=CONTENT_TYPE)


@router.get("/metrics/workers", dependencies=Protected, include_in_schema=False)
async def worker_metrics(services: ServicesDep) -> Response:
    """Every live worker's metrics from its last heartbeat, labelled by worker: a view for
    people and for setups without a scraper per worker. Scrape the workers' own ports
    instead: this view repeats on every API replica. Behind the API key (when one is
    set): unlike /metrics it names every worker and its figures, and nothing scrapes it."""
    try:
        beats = [beat for producer in services.models.producers.values()
                 for beat in await producer.heartbeats()]
    except QueueUnavailable as exc:
        raise Problem(503, "the queue (Redis) is unreachable", kind="not-ready") from exc
    snapshots = {beat.id: (beat.metrics, {"model": beat.model, "device": beat.device})
                 for beat in beats}
    return Response(merge_worker_snapshots(snapshots), media_type=CONTENT_TYPE)
