"""ASGI middleware of the API: the request's id and trace span, request metrics, a
catch-all that keeps connections open, and the body size limit."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import tracing
from ..logs import QUIET_PATHS, log_access, request_id_var
from ..metrics import ApiMetrics
from .problems import BodyTooLarge, problem_response

log = logging.getLogger(__name__)


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


REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


class RequestContextMiddleware:
    """X-Request-ID (the client's when well-formed, else a new one) in the log context
    and every response; the request's root span (a no-op while tracing is off)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        method, path = scope.get("method", "GET"), scope.get("path", "")
        tagged = tag_only(send, request_id)

        async def tag(message: Message) -> None:
            if message["type"] == "http.response.start":
                root.set_attribute("http.response.status_code", message["status"])
                if message["status"] >= 500:  # a server's span errs on 5xx only (semconv)
                    tracing.mark_error(root, str(message["status"]))
            await tagged(message)

        if path in QUIET_PATHS:  # probes and scrapes: no span (dozens a minute per pod)
            try:
                return await self.app(scope, receive, tagged)
            finally:
                request_id_var.reset(token)
        try:
            # The one SERVER span of the request (HTTP semantic conventions): named by
            # the route template once routing has found it, e.g. GET /v1/models/{name}.
            with tracing.server_span(f"{method} {path}", headers, **{
                    "http.request.method": method, "url.path": path,
                    "cleandift.request_id": request_id}) as root:
                try:
                    await self.app(scope, receive, tag)
                finally:
                    route = getattr(scope.get("route"), "path", None)
                    if route:
                        root.update_name(f"{method} {route}")
                        root.set_attribute("http.route", route)
                    else:  # no route: the method alone (a raw path would be unbounded)
                        root.update_name(method)
        finally:
            request_id_var.reset(token)


def tag_only(send: Send, request_id: str) -> Send:
    """`send` with the X-Request-ID header added to the answer."""

    async def tag(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []),
                                  (b"x-request-id", request_id.encode())]
        await send(message)

    return tag


MODEL_STATE = "model"  # request.state.model: the served model a route chose


class MetricsMiddleware:
    """Counts requests by route template and status, and their latency; writes the access
    line of each (service/logs.py)."""

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
            model = scope.get("state", {}).get(MODEL_STATE, "")  # a served name, or none
            self.metrics.requests.labels(route=path, status=str(status), model=model).inc()
            seconds = time.perf_counter() - start
            self.metrics.latency.labels(route=path, model=model).observe(seconds)
            log_access(scope.get("method", ""), scope.get("path", ""), status, seconds, model)


class CatchAllMiddleware:
    """An unexpected error becomes a 500 problem here, with an id to find it in the log.

    Starlette's own last-resort handler answers and then re-raises, which makes uvicorn
    close the keep-alive connection: the client's next request would be reset. Handled
    here, the connection stays usable and the error text stays in the log.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("unhandled error %s on %s %s", error_id, scope.get("method"),
                          scope.get("path"))
            if started:
                raise
            detail = f"internal error (id {error_id}; the service log has the details)"
            await problem_response(500, detail)(scope, receive, send)
