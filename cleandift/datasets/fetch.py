"""Fetching one image over HTTP(S) within a byte limit and a deadline for the whole
fetch, whatever the server does (slow headers, a trickling or endless body)."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

READ_CHUNK = 1 << 16


class ItemError(OSError):
    """One item cannot be read (unreachable, too slow, too large, not a file, malformed
    URL): its error row, never the end of the run."""


def fetch_url(url: str, max_bytes: int, timeout_s: float) -> bytes:
    """GET `url`, streamed, stopping at `max_bytes` (after decompression) and at
    `timeout_s` in all: httpx's timeouts apply to each read, so a server that
    sends a byte every few seconds, or without end, would otherwise hold the run."""
    import httpx

    deadline = _Deadline(timeout_s)
    try:
        with (deadline,
              httpx.Client(timeout=timeout_s, follow_redirects=True) as client,
              client.stream("GET", url, extensions={"trace": deadline.trace}) as response):
            response.raise_for_status()
            return _capped_body(response, max_bytes, deadline)
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, ValueError, OSError) as exc:
        if deadline.expired:
            reason = f"it took over {timeout_s:g} s"
        elif isinstance(exc, httpx.HTTPStatusError):
            reason = f"HTTP {exc.response.status_code}"
        else:
            reason = str(exc) or type(exc).__name__
        raise ItemError(f"cannot fetch {url}: {reason}") from exc


def _capped_body(response: Any, max_bytes: int, deadline: _Deadline) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ItemError(f"it is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    for chunk in response.iter_bytes(READ_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise ItemError(f"it sent more than {max_bytes} bytes")
        if deadline.expired:
            break
    if deadline.expired:  # (a cut connection can look like the end of a body)
        raise ItemError("out of time")
    return bytes(body)


class _Deadline:
    """Cuts a fetch's connections when its time is up, whatever it is doing (connecting,
    waiting for headers, reading the body): shutting a socket down wakes a blocked read."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._timer.cancel()
        self._timer.join()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: remember each connection as it opens (TCP, then TLS)."""
        if not event.endswith(("connect_tcp.complete", "start_tls.complete")):
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            with self._lock:
                self._sockets.append(sock)
                if self.expired:
                    _cut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _cut(sock)


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # the plain socket's shutdown, for TLS too (its own
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # would try to unwrap first)
