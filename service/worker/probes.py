"""A worker's own HTTP port: /metrics for Prometheus, /healthz and /readyz for probes.

Ready means: the model is loaded (the server starts only after that) and the last
heartbeat reached Redis recently; a worker cut off from Redis is taken out of rotation.
Alive (/healthz) fails only when a forward pass is hung: restarting is the cure.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

Check = Callable[[], tuple[bool, str]]


def serve_worker_http(port: int, render_metrics: Callable[[], bytes], ready: Check,
                      alive: Check, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve on `host` (the process's bind address: 127.0.0.1 unless configured)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            if self.path == "/metrics":
                self._send(200, render_metrics(), CONTENT_TYPE_LATEST)
            elif self.path in ("/healthz", "/readyz"):
                ok, reason = (alive if self.path == "/healthz" else ready)()
                self._send(200 if ok else 503, reason.encode() + b"\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args) -> None:  # probes every few seconds: keep logs clean
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="worker-http", daemon=True).start()
    return server
