"""Fetching a large result from the worker that holds it: one hop, straight into one
buffer.

This is a deliberately small HTTP/1.1 client for one request shape (GET a body whose
length we know, from a worker we trust): kept-alive sockets per worker, the body read
with `recv_into` into a single preallocated buffer, no per-chunk parsing. A general
client (httpx) spent most of the API's CPU on these reads. If the worker cannot deliver
(it died, restarted, or the result expired), the caller submits the job again: the API
still holds it, so the client is answered, late but right.
"""

from __future__ import annotations

import asyncio
import socket
from collections import defaultdict
from urllib.parse import urlsplit

import numpy as np

from ..messages import ResultMeta

HEAD_LIMIT = 16 * 1024
POOL_PER_WORKER = 64
RECEIVE_BUFFER = 4 * 1024 * 1024  # few, large reads


class FetchFailed(Exception):
    pass


class WrongAnswer(FetchFailed):
    """The worker answered, but not with the result (fetched already, expired)."""


class ResultFetcher:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._idle: dict[tuple[str, int], list[socket.socket]] = defaultdict(list)

    async def fetch(self, meta: ResultMeta) -> memoryview:
        """The result's raw bytes; raises FetchFailed (the socket is then dropped)."""
        url = urlsplit(meta.location)
        address = (url.hostname or "", url.port or 80)
        request = (f"GET {url.path}?token={meta.token} HTTP/1.1\r\n"
                   f"Host: {url.netloc}\r\n\r\n").encode()
        for reused in (True, False):  # a kept-alive socket may have been closed meanwhile
            sock = self._take(address) if reused else None
            if reused and sock is None:
                continue
            try:
                sock = sock or await self._connect(address)
                body = await asyncio.wait_for(self._exchange(sock, request, meta.nbytes),
                                              self.timeout_s)
            except (OSError, asyncio.TimeoutError, FetchFailed) as exc:
                if sock is not None:
                    sock.close()
                if reused and not isinstance(exc, WrongAnswer):
                    continue  # most likely closed while idle: once more, on a new socket
                raise FetchFailed(f"{meta.location}: {type(exc).__name__}: {exc}") from exc
            self._give_back(address, sock)
            return body
        raise FetchFailed(f"{meta.location}: unreachable")

    async def _exchange(self, sock: socket.socket, request: bytes, nbytes: int) -> memoryview:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, request)
        head, rest = await _read_head(sock)
        status, length = _status_and_length(head)
        if status != 200 or length != nbytes:
            raise WrongAnswer(f"status {status}, length {length} (expected {nbytes})")
        body = np.empty(nbytes, np.uint8).data  # not zero-filled: every byte is received
        got = len(rest)
        body[:got] = rest
        while got < nbytes:
            n = await loop.sock_recv_into(sock, body[got:])
            if n == 0:
                raise FetchFailed(f"the worker closed the connection after {got} bytes")
            got += n
        return body

    async def _connect(self, address: tuple[str, int]) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, address), 2.0)
        except BaseException:
            sock.close()
            raise
        return sock

    def _take(self, address: tuple[str, int]) -> socket.socket | None:
        idle = self._idle[address]
        return idle.pop() if idle else None

    def _give_back(self, address: tuple[str, int], sock: socket.socket) -> None:
        idle = self._idle[address]
        if len(idle) < POOL_PER_WORKER:
            idle.append(sock)
        else:
            sock.close()

    async def aclose(self) -> None:
        for sockets in self._idle.values():
            for sock in sockets:
                sock.close()
        self._idle.clear()


async def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """(status line and headers, the first body bytes read with them)."""
    loop, data = asyncio.get_running_loop(), b""
    while b"\r\n\r\n" not in data:
        if len(data) > HEAD_LIMIT:
            raise FetchFailed("the worker's answer has no end of headers")
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise FetchFailed("the worker closed the connection")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _status_and_length(head: bytes) -> tuple[int, int]:
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
        headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        length = int({k.strip().lower(): v for k, v in headers.items()}["content-length"])
    except (IndexError, ValueError, KeyError) as exc:
        raise FetchFailed(f"unreadable answer head: {lines[:1]}") from exc
    return status, length
