"""The FastAPI application factory: settings, broker, metrics and middleware wired once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from cleandift.settings import Settings

from ..metrics import ApiMetrics
from ..queue.connect import async_client
from ..queue.keys import Keys
from ..queue.producer import JobProducer
from .decoding import MemoryBudget
from .malloc import return_memory_promptly
from .middleware import BodyLimitMiddleware, CatchAllMiddleware, MetricsMiddleware
from .problems import install_handlers
from .routes import STATIC_DIR, router

DESCRIPTION = """CleanDIFT features (one clean forward pass of a distilled Stable Diffusion
UNet, read at 11 decoder positions) and semantic correspondences. Errors are
`application/problem+json`."""


def create_app(settings: Settings) -> FastAPI:
    if not settings.redis_url:
        raise ValueError("the API needs a Redis URL (CLEANDIFT_REDIS_URL or REDIS_URL)")
    redis_url = settings.redis_url

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = async_client(redis_url)
        producer = JobProducer(client, Keys(settings.queue_prefix),
                               max_queue=settings.max_queue, stream_maxlen=settings.stream_maxlen,
                               worker_ttl_s=settings.worker_ttl_s,
                               no_worker_grace_s=settings.no_worker_grace_s)
        await producer.start()
        app.state.producer = producer
        try:
            yield
        finally:
            await producer.stop()

    app = FastAPI(title="CleanDIFT feature service", version="0.1.0",
                  description=DESCRIPTION, lifespan=lifespan)
    return_memory_promptly()
    app.state.settings = settings
    app.state.metrics = ApiMetrics()
    app.state.decode_budget = MemoryBudget(settings.decode_memory_bytes)
    install_handlers(app)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: counts all
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` with several API processes (settings from env)."""
    return create_app(Settings())
