"""RFC 9457 problem+json for every error the API returns, each error family mapped once.

- `Problem`: raised by API code with its status.
- `RequestError` (the contract's rules: layers, sizes, points): 422.
- `ImageError` (undecodable, empty, too many pixels): its own status (400 or 413).
- Queue errors: full 429, unavailable 503, deadline 504 (429 and 503 with Retry-After).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cleandift.contract import ECHO_CHARS, RequestError
from cleandift.images import ImageError

from ..messages import CLIENT_CLOSED, PROBLEM_MEDIA_TYPE, PROBLEM_TYPE_BASE
from ..queue.errors import (
    ClientGone,
    NoAnswerByDeadline,
    NoLiveWorker,
    QueueFull,
    QueueUnavailable,
)

MEDIA_TYPE = PROBLEM_MEDIA_TYPE
TYPE_BASE = PROBLEM_TYPE_BASE
RETRY = {"Retry-After": "1"}  # 429 and 503: worth retrying after a second
PHRASES = {CLIENT_CLOSED: "Client Closed Request"}  # statuses HTTPStatus does not name
MAX_DETAIL_CHARS = 2000
MAX_ERRORS = 5  # validation errors described in one answer

PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
}


class Problem(Exception):
    """Raise anywhere in a request to answer with this status and detail."""

    def __init__(self, status: int, detail: str, *, kind: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}
        self.kind = kind or _slug(status)


class BodyTooLarge(Exception):
    """Raised while reading a streamed body that passes the configured limit."""


def _slug(status: int) -> str:
    return _phrase(status).lower().replace(" ", "-")


def problem_response(status: int, detail: str, kind: str | None = None,
                     headers: Mapping[str, str] | None = None) -> JSONResponse:
    if len(detail) > MAX_DETAIL_CHARS:  # messages cut what they echo; this is the backstop
        detail = detail[:MAX_DETAIL_CHARS] + "…"
    body = {"type": TYPE_BASE + (kind or _slug(status)), "title": _phrase(status),
            "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


def _phrase(status: int) -> str:
    return PHRASES.get(status) or HTTPStatus(status).phrase


# The one mapping from the errors of the layers below to HTTP problems: a table, so that
# the handlers FastAPI installs (`MAPPED`) and the answers cannot drift apart.
_PROBLEMS: dict[type[Exception], Callable[[Exception], Problem]] = {
    RequestError: lambda e: Problem(422, str(e)),
    ImageError: lambda e: Problem(e.status, str(e)),  # type: ignore[attr-defined]
    QueueFull: lambda _: Problem(429, "the queue is full; retry later", kind="overloaded",
                                 headers=RETRY),
    QueueUnavailable: lambda _: Problem(503, "the queue is unreachable", kind="not-ready",
                                        headers=RETRY),
    NoLiveWorker: lambda _: Problem(503, "no worker is alive to run the request",
                                    kind="no-worker", headers=RETRY),
    NoAnswerByDeadline: lambda _: Problem(504, "no worker answered before the deadline",
                                          kind="deadline"),
    # Nobody reads it: for the access log and the metrics.
    ClientGone: lambda _: Problem(CLIENT_CLOSED, "the client closed the request",
                                  kind="client-closed"),
    BodyTooLarge: lambda _: Problem(413, "the request body is over the size limit",
                                    kind="payload-too-large"),
}
MAPPED: tuple[type[Exception], ...] = (Problem, *_PROBLEMS)


def as_problem(exc: Exception) -> Problem:
    """The problem an error of a lower layer answers (its closest mapped class)."""
    if isinstance(exc, Problem):
        return exc
    for kind in type(exc).__mro__:
        if kind in _PROBLEMS:
            return _PROBLEMS[kind](exc)
    raise TypeError(f"no problem mapping for {type(exc).__name__}")


def install_handlers(app: FastAPI) -> None:
    async def _mapped(_request: Request, exc: Exception) -> JSONResponse:
        problem = as_problem(exc)
        return problem_response(problem.status, problem.detail, problem.kind, problem.headers)

    handler: Callable[[Request, Any], Awaitable[JSONResponse]] = _mapped
    for error in MAPPED:
        app.add_exception_handler(error, handler)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(422, describe_validation(exc.errors()))


def describe_validation(errors: Any) -> str:
    """Where and what, for each error: a location can be a client's key (an unexpected
    field of any length), so it is cut like any echoed value."""
    parts = []
    for error in errors[:MAX_ERRORS]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{_cut(where) or 'request'}: {_cut(str(error.get('msg', 'invalid')))}")
    more = len(errors) - MAX_ERRORS
    return "; ".join(parts + [f"{more} more"] * (more > 0)) or "invalid request"


def _cut(text: str) -> str:
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "…"
