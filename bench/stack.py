"""Start the real service stack as separate processes (redis-server, worker, API), the
way it runs in production, for benchmarks and fault tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from cleandift.service.processes.redis_server import (
    RedisServer,
    die_with_parent,
    free_port,
    start_redis_server,
)


@dataclass
class Stack:
    redis: RedisServer | None
    redis_url: str
    env: dict[str, str]
    api: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    url: str = ""

    worker_module: str = "cleandift.cli"  # bench/transport.py uses its shape-only worker

    def start_worker(self, **env: str) -> subprocess.Popen:
        worker = _spawn("worker", {**self.env, **env}, self.worker_module)
        self.workers.append(worker)
        return worker

    def start_api(self, **env: str) -> None:
        port = free_port()
        self.api = _spawn("api", {**self.env, "CLEANDIFT_PORT": str(port), **env})
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the service at {self.url} did not become ready")
            time.sleep(0.2)

    def stop(self) -> None:
        for process in [*self.workers, self.api]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.workers, self.api]:
            if process is not None:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        if self.redis is not None:
            self.redis.stop()


def _spawn(command: str, env: dict[str, str], module: str = "cleandift.cli"
           ) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, command], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=die_with_parent)


@contextmanager
def service_stack(model: str, *, workers: int = 1, redis_url: str | None = None,
                  worker_module: str = "cleandift.cli", ready_timeout_s: float = 120.0,
                  worker_envs: list[dict[str, str]] | None = None, **settings: str):
    """A ready stack: API + `workers` workers on `model` (or one worker per entry of
    `worker_envs`, each with those variables on top); settings as CLEANDIFT_* values.

    The feature cache is off unless asked for: the benchmarks send one image again and
    again, and would otherwise measure the cache instead of the path they are about."""
    settings = {"feature_cache_bytes": "0", "feature_cache_shared_bytes": "0", **settings}
    redis = None if redis_url else start_redis_server()
    url = redis_url or redis.url  # type: ignore[union-attr]
    env = {**os.environ, "CLEANDIFT_REDIS_URL": url, "CLEANDIFT_MODEL": model,
           "CLEANDIFT_WORKER_PORT": "0", "CLEANDIFT_HOST": "127.0.0.1",
           **{f"CLEANDIFT_{k.upper()}": str(v) for k, v in settings.items()}}
    stack = Stack(redis, url, env, worker_module=worker_module)
    try:
        for extra in worker_envs or [{}] * workers:
            stack.start_worker(**extra)
        stack.start_api()
        stack.wait_ready(ready_timeout_s)
        yield stack
    finally:
        stack.stop()
