"""Test infrastructure for the service: a real uvicorn server and real workers in threads."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis
import torch
import uvicorn

from cleandift.images import decode_for_model, to_pixels
from cleandift.service.api.app import create_app
from cleandift.service.processes.launch_worker import build_worker
from cleandift.service.processes.redis_server import free_port
from cleandift.settings import Settings

# A stopping API waits for its requests in flight, a stopping worker for its claimed jobs:
# under a loaded machine that takes a while, and a thread still running after this long
# is reported by the suite's leak check (tests/conftest.py).
STOP_WAIT_S = 90.0
GRACEFUL_S = 20.0  # then uvicorn's force_exit: it no longer waits for requests in flight
CANCEL_WAIT_S = 5.0  # for the tasks left when the server returns, once cancelled


class ApiServer:
    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.loop = asyncio.new_event_loop()  # ours, so a stuck stop can say what it awaits
        self.ignored_cancel = ""
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"test-api-{self.port}")
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "API did not start"
            time.sleep(0.02)
        return self

    def _run(self) -> None:
        """As asyncio.run does, but a task that ignores its cancellation is reported (with
        where it waits) instead of hanging the thread."""
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve())
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.wait(pending, timeout=CANCEL_WAIT_S))
            self.ignored_cancel = self._stuck() if asyncio.all_tasks(self.loop) else ""
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def __exit__(self, *_exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=GRACEFUL_S)
        if self.thread.is_alive():  # a request still waiting on a job: stop without it
            self.server.force_exit = True
            self.thread.join(timeout=STOP_WAIT_S)
        assert not self.thread.is_alive(), f"the API did not stop; awaiting:\n{self._stuck()}"
        assert not self.ignored_cancel, f"tasks ignored their cancellation:\n{self.ignored_cancel}"

    def _stuck(self) -> str:
        """Where each of the loop's tasks waits (read from another thread: a diagnosis)."""
        lines = []
        for task in list(asyncio.all_tasks(self.loop)):
            frames = task.get_stack()
            where = " <- ".join(f"{f.f_code.co_name} ({f.f_code.co_filename.rsplit('/', 1)[-1]}"
                                f":{f.f_lineno})" for f in reversed(frames))
            lines.append(f"{task.get_name()}: {where}")
        thread = sys._current_frames().get(self.thread.ident or 0)
        stack = "".join(traceback.format_stack(thread)[-6:]) if thread else ""
        return "\n".join(lines) + "\nthread:\n" + stack


class WorkerThread:
    """A real Worker (same code as `cleandift worker`) sharing the session's model."""

    def __init__(self, settings: Settings, extractor, name: str | None = None) -> None:
        named = settings.model_copy(update={"worker_id": name or f"w-{uuid.uuid4().hex[:6]}"})
        self.worker = build_worker(named, extractor)
        self.thread = threading.Thread(target=self.worker.run, daemon=True,
                                       name=f"test-worker-{named.worker_id}")

    def __enter__(self) -> WorkerThread:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.worker.stop()
        self.thread.join(timeout=STOP_WAIT_S)


def wait_ready(client: httpx.Client, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "service never became ready"
        time.sleep(0.05)


@contextmanager
def running_service(settings: Settings, extractor, workers: int = 1):
    with ApiServer(settings) as api:
        threads = [WorkerThread(settings, extractor) for _ in range(workers)]
        for thread in threads:
            thread.__enter__()
        try:
            with httpx.Client(base_url=api.url, timeout=60) as client:
                wait_ready(client)
                yield client, threads
        finally:
            for thread in threads:
                thread.__exit__()




def metric(text: str, name: str, /, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


WORKERS = "/metrics/workers"  # the workers' figures, from their heartbeats


def wait_metric(client: httpx.Client, name: str, value: float, /, timeout: float = 10,
                path: str = WORKERS, **labels: str) -> str:
    """Scrape `path` until `name` reaches `value` (worker figures arrive by heartbeat)."""
    deadline = time.monotonic() + timeout
    while True:
        text = client.get(path).text
        if metric(text, name, **labels) >= value or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url)


def expected_features(extractor, data: bytes, layers, size: int = 256) -> dict[str, torch.Tensor]:
    """What the core extractor gives for an uploaded file (same decode and resize)."""
    array, _ = decode_for_model(data, size, max_bytes=1 << 30, max_pixels=1 << 30)
    pixels = to_pixels([array])
    feats = extractor.features(pixels, layers)
    return {k: v[0].float().cpu() for k, v in feats.items()}


@contextmanager
def serving(args: list[str], cache_dir: Path, log: Path, cwd: Path | None = None,
            **env: str) -> Iterator[str]:
    """`cleandift serve` as a user runs it (its own redis-server, a worker process), on a
    free port, in `cwd` (relative paths in `args`); yields its URL once ready."""
    port = free_port()
    full = {**os.environ, "CLEANDIFT_CACHE_DIR": str(cache_dir), "CLEANDIFT_WORKER_PORT": "0",
            "CLEANDIFT_TORCH_THREADS": "1", **env}
    for name in ("REDIS_URL", "CLEANDIFT_MODEL", "CLEANDIFT_MODELS"):
        full.pop(name, None)
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "cleandift.cli", "serve", "--port",
                                  str(port), *args], env=full, stdout=out,
                                 stderr=subprocess.STDOUT, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert serve.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield url
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
