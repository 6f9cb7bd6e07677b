"""A worker's own HTTP port: /metrics for Prometheus, /healthz and /readyz for probes, and
/results/ID for the API to fetch large results in one hop.

Ready means: the model is loaded (the server starts only after that) and the last
heartbeat reached Redis recently; a worker cut off from Redis is taken out of rotation.
Alive (/healthz) fails only when a forward pass is hung: restarting is the cure. A
result is served once, to whoever shows its token (the API read it from Redis).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from ..messages import PROBLEM_MEDIA_TYPE, PROBLEM_TYPE_BASE
from .results import ResultStore

Check = Callable[[], tuple[bool, str]]
RESULTS_PATH = "/results/"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Accept a burst at once (the stdlib's 5 leaves the rest to TCP's retries, seconds
    # apart: 200 idle sockets delayed a probe by 30 s); the idle timeout then ends them.
    request_queue_size = 128


SHUTDOWN_POLL_S = 0.05


def serve_worker_http(port: int, render_metrics: Callable[[], bytes], ready: Check,
                      alive: Check, host: str = "127.0.0.1",
                      results: ResultStore | None = None,
                      facts: Callable[[], dict[str, object]] = dict,
                      idle_timeout_s: float = 30.0) -> ThreadingHTTPServer:
    """Serve on `host` (the process's bind address: 127.0.0.1 unless configured); port 0
    takes any free port (`server.server_address` says which). Each connection holds a
    thread, so one that stays silent for `idle_timeout_s` is closed (the API's fetcher
    reconnects when it finds a kept-alive socket closed)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the API reuses its connections
        timeout = idle_timeout_s  # each read and write of the socket; idle: closed

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            url = urlsplit(self.path)
            if url.path.startswith(RESULTS_PATH) and results is not None:
                token = parse_qs(url.query).get("token", [""])[0]
                body = results.take(url.path[len(RESULTS_PATH):], token)
                if body is None:
                    self._send(*problem(404, "no such result (fetched already, expired, or "
                                        "bad token)", "not-found"))
                else:
                    self._send(200, body, "application/octet-stream")
            elif url.path == "/metrics":
                self._send(200, render_metrics(), CONTENT_TYPE_LATEST)
            elif url.path in ("/healthz", "/readyz"):
                ok, reason = (alive if url.path == "/healthz" else ready)()
                self._send(*probe_answer(url.path, ok, reason, facts()))
            else:
                self._send(*problem(404, f"no such path: {url.path}", "not-found"))

        def _send(self, status: int, body: bytes | memoryview,
                  content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:  # probes every few seconds: quiet
            pass

    server = _Server((host, port), Handler)
    # shutdown() waits for the loop's next poll: 50 ms, not socketserver's 0.5 s, so a
    # stopping worker (and every test of one) is not held up by its port.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": SHUTDOWN_POLL_S},
                     name="worker-http", daemon=True).start()
    return server


def probe_answer(path: str, ok: bool, reason: str, facts: dict[str, object]
                 ) -> tuple[int, bytes, str]:
    """(status, body, media type) of a probe, in the API's format: /healthz {"status":
    "ok"}, /readyz the API's fields for this worker's model (`facts`), each with the
    worker's `detail`; or a 503 problem+json with the reason."""
    if not ok:
        return problem(503, reason, "not-ready")
    body = {"status": "ok"} if path == "/healthz" else {"status": "ready", **facts}
    return 200, json.dumps({**body, "detail": reason}).encode(), "application/json"


def problem(status: int, detail: str, kind: str) -> tuple[int, bytes, str]:
    title = {404: "Not Found", 503: "Service Unavailable"}[status]
    body = {"type": PROBLEM_TYPE_BASE + kind, "title": title, "status": status,
            "detail": detail}
    return status, json.dumps(body).encode(), PROBLEM_MEDIA_TYPE


def advertised_host(bind: str) -> str:
    """The address other hosts reach this worker at: the bind address, or this host's
    own address when bound to all interfaces (set CLEANDIFT_WORKER_ADVERTISE_HOST, e.g. the
    pod IP, where that guess is wrong)."""
    if bind in ("0.0.0.0", "::", ""):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return bind
