"""Log lines of the service: plain text or one JSON object per line, each with the request
id of the request it belongs to (`-` when it belongs to none).

The id lives in a context variable set by the API's request middleware; code outside a
request (the worker, which runs many requests per batch) passes it per line with
`extra={"request_id": ...}`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import datetime, timezone

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
QUIET = ("httpx", "httpcore", "uvicorn.access")  # a line per request otherwise


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id` (the caller's, else the current request's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines (Loki, Cloud Logging, ELK)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
            "process": record.process,
        }
        http = getattr(record, "http", None)
        if isinstance(http, dict):  # an access line's fields
            line["http"] = http
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """The root logger's one handler, on stderr; uvicorn's loggers propagate to it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


ACCESS = logging.getLogger("cleandift.access")
QUIET_PATHS = ("/healthz", "/readyz", "/readyz/api", "/metrics")  # probes and scrapes: DEBUG


def log_access(method: str, path: str, status: int, seconds: float, model: str) -> None:
    """One line per request, whatever its status (401, 429, 503 too): method, path, status,
    duration, model, and the request id of the line's context. Probes and scrapes go at
    DEBUG, so that a pod's log is its traffic, not its health checks."""
    fields = {"method": method, "path": path, "status": status,
              "duration_ms": round(seconds * 1000, 1), "model": model}
    level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
    ACCESS.log(level, '%s %s %d %.1f ms model=%s', method, path, status,
               fields["duration_ms"], model or "-", extra={"http": fields})

