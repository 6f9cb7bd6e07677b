"""The FastAPI application factory: settings, broker, metrics and middleware wired once."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cleandift.settings import Settings

from ..metrics import ApiMetrics
from ..queue.keys import Keys
from ..queue.producer import JobProducer
from .problems import BodyTooLarge, install_handlers, problem_response
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
        client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=2,
                                         socket_timeout=10, health_check_interval=10)
        producer = JobProducer(client, Keys(settings.queue_prefix),
                               max_queue=settings.max_queue, stream_maxlen=settings.stream_maxlen,
                               worker_ttl_s=settings.worker_ttl_s)
        await producer.start()
        app.state.producer = producer
        try:
            yield
        finally:
            await producer.stop()

    app = FastAPI(title="CleanDIFT feature service", version="0.1.0",
                  description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = ApiMetrics()
    install_handlers(app)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: counts all
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` with several API processes (settings from env)."""
    return create_app(Settings())


class BodyLimitMiddleware:
    """413 for bodies over the limit, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge
            return message

        await self.app(scope, limited, send)  # BodyTooLarge is answered by its handler

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"the request body is over the limit of {self.limit} bytes"
        await problem_response(413, detail, "payload-too-large")(scope, receive, send)


class MetricsMiddleware:
    """Counts requests by route template and status, and their latency."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(route=path, status=str(status)).inc()
            self.metrics.latency.labels(route=path).observe(time.perf_counter() - start)
