"""One client must not take the service from everybody else: the worst /correspond the
limits allow, a burst of huge JPEGs, a worker killed under `cleandift serve`."""

from __future__ import annotations

import io
import itertools
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
from tests.service.service_helpers import metric, wait_metric

pytestmark = pytest.mark.integration
SIDE = 7000


@pytest.fixture(scope="module")
def huge_jpeg() -> bytes:
    """A 7000 x 7000 photo-like JPEG (49 megapixels, under the 50 M limit)."""
    image = textured_image(SIDE // 8, SIDE // 8, seed=11).resize((SIDE, SIDE),
                                                                  Image.Resampling.BICUBIC)
    return encode(image, "JPEG", quality=80)


@pytest.fixture(scope="module")
def flat_jpeg() -> bytes:
    """A 7000 x 7000 solid grey JPEG: near-constant features, where no patch bound prunes
    and exact matching costs its worst case."""
    return encode(Image.new("RGB", (SIDE, SIDE), (128, 128, 128)), "JPEG", quality=80)


@pytest.mark.parametrize("kind", ["photo", "flat"])
def test_the_worst_correspondence_the_limits_allow_does_not_starve_others(
        demo_dir, huge_jpeg, flat_jpeg, record, kind):
    small = encode(textured_image(640, 480, 12), "JPEG")
    target = huge_jpeg if kind == "photo" else flat_jpeg
    points = [[x * 6.39, y * 4.79] for x in range(40) for y in range(25)]  # 1000, the maximum
    with service_stack(str(demo_dir), queue_prefix="worstmatch", torch_threads="1") as stack:
        with ThreadPoolExecutor(max_workers=1) as pool:
            start = time.monotonic()
            worst = pool.submit(httpx.post, stack.url + "/correspond", timeout=60,
                                files={"source": small, "target": target},
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
        inexact = sum(not m["exact"] for m in body["matches"])
        with httpx.Client(base_url=stack.url) as client:  # worker figures come by heartbeat
            text = wait_metric(client, "cleandift_matches_inexact_total", inexact)
        inexact_total = metric(text, "cleandift_matches_inexact_total")
    assert len(body["matches"]) == 1000
    assert all(0 <= m["target"][0] <= SIDE - 1 for m in body["matches"])
    assert inexact == inexact_total  # every stopped search is said, and counted
    if kind == "photo":
        assert inexact == 0
    assert [s for s, _ in beside] == [200] * 8
    inference = body["timings_ms"]["inference"]
    latencies = sorted(t for _, t in beside)
    record(fault=f"worst /correspond the limits allow (1000 points, 7000x7000 {kind} target, "
           "heatmap) beside 8 /features", sent=9, succeeded=9, refused=0, errors=0, lost=0,
           notes=f"correspond answered in {worst_s:.2f} s (forward {inference:.0f} ms), "
                 f"{1000 - inexact} of 1000 matches proven exact; /features beside it: "
                 f"median {latencies[4] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms")


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
    """Requests, one after another from each of `n` threads, each allowed `timeout` s: a
    client that waits longer is a failure (httpx raises). Each request sends another
    image, so none is a cache hit answered in milliseconds: each takes a forward."""

    def __init__(self, url: str, n: int, timeout: float = 10) -> None:
        self.url, self.stop, self.timeout = url, threading.Event(), timeout
        self.seen: list[tuple[float, int, float]] = []  # (sent at, status, seconds)
        self.active = 0  # requests sent and not yet answered
        self._lock = threading.Lock()
        self._images = itertools.cycle([encode(textured_image(320, 240, seed), "JPEG")
                                        for seed in range(100, 164)])
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while not self.stop.is_set():
                with self._lock:
                    image = next(self._images)
                    self.active += 1
                sent = time.monotonic()
                try:
                    status = client.post(self.url + "/features", files={"image": image},
                                         data={"size": "512"}).status_code
                except httpx.HTTPError as exc:
                    status = -1
                    print("client error", type(exc).__name__, exc)
                with self._lock:
                    self.active -= 1
                self.seen.append((sent, status, time.monotonic() - sent))
                time.sleep(0.1)

    def finish(self) -> list[tuple[float, int, float]]:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)
        return self.seen


def _extract_dataset(url: str, root: Path, out: Path, env: dict) -> subprocess.Popen:
    """`cleandift extract-dataset --service`: its client rides through the restart."""
    return subprocess.Popen([sys.executable, "-m", "cleandift.cli", "extract-dataset",
                             str(root), "--out", str(out), "--service", url, "--layers", "us6",
                             "--size", "256", "--concurrency", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_serve_restarts_a_killed_worker_and_its_redis_and_loses_no_accepted_request(
        demo_dir, cache_dir, record, tmp_path):
    """kill -9 of the only worker: the requests in flight wait for its successor (their
    jobs are in Redis, their deadlines allow it) and all get 200; new requests get 503
    at once while no worker lives; an `extract-dataset --service` run rides through.
    Then the private redis-server is killed too."""
    from tests.cleandift.test_bulk import write_folder

    port = free_port()
    env = {**os.environ, "CLEANDIFT_MODEL": str(demo_dir), "CLEANDIFT_CACHE_DIR": str(cache_dir),
           "CLEANDIFT_WORKER_PORT": "0", "CLEANDIFT_TORCH_THREADS": "1"}
    env.pop("REDIS_URL", None)
    log, images = tmp_path / "serve.log", write_folder(tmp_path / "images", 40)
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "cleandift.cli", "serve", "--port",
                                  str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url), 120, "serve to be ready", interval=0.2)
        victim = _worker_pid(serve)
        assert victim is not None, _children(serve.pid)
        clients = Clients(url, 6, timeout=90)
        bulk = _extract_dataset(url, images, tmp_path / "dataset", env)
        time.sleep(3.0)
        assert bulk.poll() is None, "extract-dataset finished before the kill"
        wait_for(lambda: clients.active >= 3, 30, "requests in flight at the kill")
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: any(sent > killed_at and status == 200
                             for sent, status, _ in clients.seen), 90, "a 200 after the kill")
        bulk_output = bulk.communicate(timeout=300)[0].decode()
        bulk_s = time.monotonic() - killed_at
        successor = _worker_pid(serve)
        redis_pid = next(p for p, cmd in _children(serve.pid).items() if "redis-server" in cmd)
        os.kill(redis_pid, signal.SIGKILL)
        redis_killed_at = time.monotonic()
        wait_for(lambda: any(sent > redis_killed_at and status == 200
                             for sent, status, _ in clients.seen), 90, "a 200 after Redis died")
        seen = clients.finish()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    text = log.read_text()
    assert f"(pid {victim}) was killed by SIGKILL; restarting it" in text, text[-3000:]
    assert f"redis-server (pid {redis_pid}) was killed by SIGKILL; restarting it" in text
    assert successor is not None and successor != victim
    assert bulk.returncode == 0, bulk_output[-3000:]
    counts = json.loads(bulk_output.strip().splitlines()[-1])
    in_flight = [status for sent, status, took in seen if sent < killed_at < sent + took]
    after = [(sent, status, took) for sent, status, took in seen
             if sent + took > killed_at and sent < redis_killed_at]
    assert in_flight and in_flight == [200] * len(in_flight), in_flight
    assert all(status in (200, 503) for _, status, _ in after), after
    refused_waits = [took for _, status, took in after if status == 503]
    assert all(took < 10.0 for took in refused_waits), refused_waits  # at once, not a wait
    redis_back = min(s + t for s, status, t in seen if s > redis_killed_at and status == 200)
    first_200 = min(sent + took for sent, status, took in after
                    if status == 200 and sent > killed_at) - killed_at
    longest = max(took for _, _, took in after)
    statuses = [status for _, status, _ in after]
    record(fault="worker SIGKILLed under `cleandift serve` (6 clients, extract-dataset)",
           sent=len(after), succeeded=statuses.count(200), refused=statuses.count(503),
           errors=0, lost=0,
           notes=f"restarted by serve; in flight at the kill: {in_flight.count(200)} of "
                 f"{len(in_flight)} answered 200 (longest wait {longest:.1f} s); new requests "
                 f"503 (Retry-After) at once while no worker lived; first new 200 "
                 f"{first_200:.1f} s after the kill; extract-dataset --service running at the "
                 f"kill finished {bulk_s:.0f} s after it ({counts}); then the private "
                 f"redis-server SIGKILLed: restarted empty, next 200 "
                 f"{redis_back - redis_killed_at:.1f} s later")


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


