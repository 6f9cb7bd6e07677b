"""The FastAPI application factory: settings, broker, metrics and middleware wired once."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from cleandift import __version__
from cleandift.settings import Settings

from ..fleet import fleet_of
from ..metrics import ApiMetrics
from .decoding import MemoryBudget
from .deps import Services
from .docs import install_docs
from .fetch import ResultFetcher
from .malloc import return_memory_promptly
from .middleware import (
    BodyLimitMiddleware,
    CatchAllMiddleware,
    MetricsMiddleware,
    RequestContextMiddleware,
)
from .problems import install_handlers
from .routes import STATIC_DIR, router
from .served import ServedModels

DESCRIPTION = """CleanDIFT features (one clean forward pass of a distilled Stable Diffusion
UNet, read at 11 decoder positions) and semantic correspondences. Errors are
`application/problem+json`."""


def create_app(settings: Settings) -> FastAPI:
    if not settings.redis_url:
        raise ValueError("the API needs a Redis URL (CLEANDIFT_REDIS_URL or REDIS_URL)")
    redis_url = settings.redis_url
    fleet_of(settings)  # a fleet that cannot be served fails here, by name
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        models = ServedModels.from_settings(settings, redis_url)
        await models.start()
        app.state.services = Services(settings, metrics,
                                      MemoryBudget(settings.decode_memory_bytes), models,
                                      ResultFetcher(settings.request_timeout_s))
        try:
            yield
        finally:
            await app.state.services.fetcher.aclose()
            await models.stop()

    return_memory_promptly()
    app = FastAPI(title="CleanDIFT feature service", version=__version__,
                  description=DESCRIPTION, lifespan=lifespan, docs_url=None, redoc_url=None,
                  **native_telemetry_off())
    install_handlers(app)
    install_docs(app)  # /docs and /redoc with their own assets: they work offline
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # counts all
    app.add_middleware(RequestContextMiddleware)  # outermost: every answer has its id
    return app


def native_telemetry_off() -> dict[str, Any]:
    """FastAPI 0.165+ traces, meters and logs on its own, on by default: a second SERVER
    span per request (ours follows the conventions and skips probes), spans around every
    dependency, metrics beside ours. Ours are the service's; FastAPI's are turned off
    (older FastAPI has no such option)."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` with several API processes (settings from env)."""
    from ..observability import configure_process

    settings = Settings()
    configure_process(settings, "cleandift-api")
    return create_app(settings)
