"""One client must not take the service from everybody else: the worst /correspond the
limits allow, a burst of huge JPEGs, a worker killed under `cleandift serve`."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from cleandift.bench.stack import service_stack
from cleandift.service.processes.redis_server import free_port
from tests.corpus import encode, textured_image
from tests.reliability.helpers import IMAGE, rss_mib, wait_for

pytestmark = pytest.mark.integration
SIDE = 7000


@pytest.fixture(scope="module")
def huge_jpeg() -> bytes:
    """A 7000 x 7000 photo-like JPEG (49 megapixels, under the 50 M limit)."""
    image = textured_image(SIDE // 8, SIDE // 8, seed=11).resize((SIDE, SIDE),
                                                                  Image.Resampling.BICUBIC)
    return encode(image, "JPEG", quality=80)


def test_the_worst_correspondence_the_limits_allow_does_not_starve_others(
        demo_dir, huge_jpeg, record):
    small = encode(textured_image(640, 480, 12), "JPEG")
    points = [[x * 6.39, y * 4.79] for x in range(40) for y in range(25)]  # 1000, the maximum
    with service_stack(str(demo_dir), queue_prefix="worstmatch", torch_threads="1") as stack:
        with ThreadPoolExecutor(max_workers=1) as pool:
            start = time.monotonic()
            worst = pool.submit(httpx.post, stack.url + "/correspond", timeout=60,
                                files={"source": small, "target": huge_jpeg},
                                data={"points": json.dumps(points), "heatmap": "true"})
            beside = []
            for _ in range(8):  # other clients meanwhile
                t0 = time.monotonic()
                response = httpx.post(stack.url + "/features", files={"image": IMAGE},
                                      timeout=60)
                beside.append((response.status_code, time.monotonic() - t0))
            answer = worst.result()
            worst_s = time.monotonic() - start
    assert answer.status_code == 200, answer.text[:300]
    body = answer.json()
    assert len(body["matches"]) == 1000
    assert all(0 <= m["target"][0] <= SIDE - 1 for m in body["matches"])
    assert [s for s, _ in beside] == [200] * 8
    inference = body["timings_ms"]["inference"]
    latencies = sorted(t for _, t in beside)
    record(fault="worst /correspond the limits allow (1000 points, 7000x7000 target, heatmap)"
           " beside 8 /features", sent=9, succeeded=9, refused=0, errors=0, lost=0,
           notes=f"correspond answered in {worst_s:.2f} s (forward {inference:.0f} ms); "
                 f"/features beside it: median {latencies[4] * 1000:.0f} ms, max "
                 f"{latencies[-1] * 1000:.0f} ms")


def test_bursts_of_huge_images_keep_the_api_memory_bounded(demo_dir, huge_jpeg, record):
    """16 concurrent 49-megapixel JPEGs (decoded at 1/8 scale), then 16 concurrent
    12-megapixel PNGs (decoded whole, within the decode memory budget)."""
    png = encode(textured_image(500, 375, 3).resize((4000, 3000)), "PNG", compress_level=1)
    rows = []
    with service_stack(str(demo_dir), queue_prefix="bigimages", max_queue="64") as stack:
        pid = stack.api.pid
        for name, data in ((f"{SIDE}x{SIDE} JPEG", huge_jpeg), ("4000x3000 PNG", png)):
            idle = rss_mib(pid)
            _reset_peak(pid)
            with ThreadPoolExecutor(max_workers=16) as pool:
                answers = list(pool.map(lambda _, d=data: httpx.post(
                    stack.url + "/features", files={"image": d}, timeout=120), range(16)))
            peak = _peak_rss_mib(pid)
            time.sleep(2)
            after = rss_mib(pid)
            assert [a.status_code for a in answers] == [200] * 16
            width, height = Image.open(io.BytesIO(data)).size
            assert answers[0].json()["image"] == {"width": width, "height": height}
            assert peak - idle < 1024, (name, idle, peak)
            assert after - idle < 200, (name, idle, after)  # given back after the burst
            rows.append(f"{name} ({len(data) // 1024} KB): idle {idle:.0f} MiB, peak "
                        f"{peak:.0f} (+{peak - idle:.0f}), 2 s later {after:.0f}")
    record(fault="16 concurrent huge images, twice (JPEG, then PNG)", sent=32, succeeded=32,
           refused=0, errors=0, lost=0, notes="API RSS: " + "; ".join(rows))


def _reset_peak(pid: int) -> None:
    """Start VmHWM afresh (Linux: writing 5 to clear_refs resets the peak)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def _children(pid: int) -> dict[int, str]:
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                child = int(stat.parent.name)
                out[child] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return out


def _worker_pid(serve: subprocess.Popen) -> int | None:
    return next((p for p, cmd in _children(serve.pid).items() if cmd.endswith("worker ")), None)


class Clients:
    """Requests, one after another from each of `n` threads, each allowed 10 s: a client
    that waits longer is a failure (httpx raises)."""

    def __init__(self, url: str, n: int) -> None:
        self.url, self.stop = url, threading.Event()
        self.seen: list[tuple[float, int, float]] = []  # (sent at, status, seconds)
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    status = client.post(self.url + "/features", files={"image": IMAGE},
                                         data={"size": "512"}).status_code
                except httpx.HTTPError as exc:
                    status = -1
                    print("client error", type(exc).__name__, exc)
                self.seen.append((sent, status, time.monotonic() - sent))
                time.sleep(0.1)

    def finish(self) -> list[tuple[float, int, float]]:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        return self.seen


def test_serve_restarts_a_killed_worker_and_its_redis_and_nobody_waits(demo_dir, cache_dir, record,
                                                                tmp_path):
    port = free_port()
    env = {**os.environ, "CLEANDIFT_MODEL": str(demo_dir), "CLEANDIFT_CACHE_DIR": str(cache_dir),
           "CLEANDIFT_WORKER_PORT": "0", "CLEANDIFT_TORCH_THREADS": "1"}
    env.pop("REDIS_URL", None)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "cleandift.cli", "serve", "--port",
                                  str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url), 120, "serve to be ready", interval=0.2)
        victim = _worker_pid(serve)
        assert victim is not None, _children(serve.pid)
        clients = Clients(url, 4)
        time.sleep(1.0)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: any(sent > killed_at and status == 200
                             for sent, status, _ in clients.seen), 60, "a 200 after the kill")
        time.sleep(1.0)
        successor = _worker_pid(serve)
        redis_pid = next(p for p, cmd in _children(serve.pid).items() if "redis-server" in cmd)
        os.kill(redis_pid, signal.SIGKILL)
        redis_killed_at = time.monotonic()
        wait_for(lambda: any(sent > redis_killed_at and status == 200
                             for sent, status, _ in clients.seen), 60, "a 200 after Redis died")
        seen = clients.finish()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    text = log.read_text()
    assert f"(pid {victim}) was killed by SIGKILL; restarting it" in text, text[-3000:]
    assert f"redis-server (pid {redis_pid}) was killed by SIGKILL; restarting it" in text
    assert successor is not None and successor != victim
    redis_back = min(s + t for s, status, t in seen if s > redis_killed_at and status == 200)
    after = [(sent, status, took) for sent, status, took in seen
             if sent + took > killed_at and sent < redis_killed_at]
    assert after and all(status in (200, 503) for _, status, _ in after), after
    first_200 = min(sent + took for sent, status, took in after if status == 200) - killed_at
    longest = max(took for _, _, took in after)
    assert longest < 10.0  # (httpx would have raised at 10 s anyway)
    statuses = [status for _, status, _ in after]
    record(fault="worker SIGKILLed under `cleandift serve` (4 clients)", sent=len(after),
           succeeded=statuses.count(200), refused=statuses.count(503), errors=0, lost=0,
           notes=f"restarted by serve; first 200 {first_200:.1f} s after the kill; longest "
                 f"wait of any client {longest:.1f} s; 503 (Retry-After) while no worker lived; "
                 f"then its private redis-server SIGKILLed: restarted empty, next 200 "
                 f"{redis_back - redis_killed_at:.1f} s later")


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


