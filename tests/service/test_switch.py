"""The fleet switch (service/worker/switch.py): a model's workers move to a new version
together, so no request sent after an answer of version N is answered by N-1."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from cleandift import load_extractor
from cleandift.service.queue.keys import Keys
from cleandift.service.worker.switch import FleetSwitch, live_version
from tests.corpus import encode, textured_image
from tests.service.service_helpers import ApiServer, WorkerThread, redis_client, wait_ready
from tests.service.test_reload import publish, unet_files  # noqa: F401 (a fixture)


@pytest.fixture
def fleet(settings):
    """Two heartbeating workers' switches on a fresh model queue."""
    r, keys = redis_client(settings), Keys(settings.queue_prefix, f"m{uuid.uuid4().hex[:6]}")
    switches = [FleetSwitch(r, keys, name, worker_ttl_s=5, timeout_s=60) for name in "ab"]
    for name in "ab":
        r.zadd(keys.workers, {name: time.time()})
    return r, keys, switches


def test_the_last_worker_to_stage_flips(fleet):
    r, keys, (a, b) = fleet
    assert a.live("v1") == "v1" and b.live("v9") == "v1"  # the first one sets it
    assert not a.stage("v2", "v1") and live_version(r, keys) == "v1"  # b is not ready yet
    assert b.stage("v2", "v1") and live_version(r, keys) == "v2"


def test_a_worker_that_failed_or_died_does_not_hold_the_switch(fleet):
    r, keys, (a, b) = fleet
    a.live("v1")
    b.failed("v2")
    assert a.stage("v2", "v1") and live_version(r, keys) == "v2"
    r.zadd(keys.workers, {"b": time.time() - 60})  # b's heartbeat stopped
    assert a.stage("v3", "v2") and live_version(r, keys) == "v3"


def test_after_the_timeout_the_ready_workers_switch_without_the_laggard(fleet):
    r, keys, (a, _) = fleet
    a.live("v1")
    a.timeout_s = 0.2
    assert not a.stage("v2", "v1")
    time.sleep(0.3)
    assert a.stage("v2", "v1") and live_version(r, keys) == "v2"


def test_a_stale_flip_never_overwrites_a_switch_it_did_not_see(fleet):
    r, keys, (a, b) = fleet
    a.live("v1")
    b.failed("v2")
    a._staged = ("v2", time.monotonic())  # a read v1, then (before its flip) ...
    r.set(keys.live, "v3")  # ... another switch happened
    assert not a._try_flip("v1") and live_version(r, keys) == "v3"


def test_a_laggard_never_sets_the_fleet_back_after_redis_lost_its_keys(fleet):
    """b could not load v2 (it serves v1) but read live = v2; Redis restarts empty: b
    restores v2, not the v1 it serves, and stays out of the fleet."""
    r, keys, (a, b) = fleet
    a.live("v1")
    b.failed("v2")
    assert a.stage("v2", "v1") and b.live("v1") == "v2"
    for key in r.scan_iter(f"{keys.ns}*"):
        r.delete(key)
    assert b.live("v1") == "v2" and live_version(r, keys) == "v2"


class _Holder:
    """ModelHolder.get's rule for a worker that holds v1 and has v2 loaded beside it."""

    def __init__(self, extractor) -> None:
        self.current, self.pending = extractor, extractor

    def get(self, version):
        return self.current if version in (None, "v1", "v2") else None


def test_jobs_claimed_when_the_live_version_cannot_be_read_are_released(fleet, settings,
                                                                      extractor):
    """The fleet flips to v2 between this worker's read and its claim; the read after the
    claim fails: the jobs get a version no worker holds (released), not the v1 read before."""
    from types import SimpleNamespace

    from cleandift.service.queue.errors import QueueUnavailable
    from cleandift.service.worker.claiming import UNREAD, Claimer

    r, keys, (a, _) = fleet
    a.live("v1")
    reads = iter([None, QueueUnavailable("timeout")])
    real = a.live

    def live(serving):
        if next(reads, None) is not None:
            raise QueueUnavailable("timeout")
        return real(serving)

    class Jobs:
        consumer = "a"

        def claim_own_pending(self, count, after="0"):
            return [], 0, ""

        def reclaim(self, count):
            return [], 0

        def claim(self, count, block_ms):
            r.set(keys.live, "v2")  # the flip, after this worker's read
            return ["a job sent after a v2 answer"]

    def safe(call, default):
        try:
            return call()
        except QueueUnavailable:
            return default

    a.live = live  # type: ignore[method-assign]
    metrics = SimpleNamespace(retried=SimpleNamespace(inc=lambda n: None),
                              dead=SimpleNamespace(inc=lambda n: None))
    holder = _Holder(SimpleNamespace(info=SimpleNamespace(version="v1")))
    claimer = Claimer(Jobs(), settings, metrics, holder, a, safe)  # type: ignore[arg-type]
    jobs, version = claimer.next()
    assert jobs and version == UNREAD and holder.get(version) is None


def test_the_switch_knows_a_worker_by_its_heartbeat_name(settings, extractor, demo_dir,
                                                        unet_files, tmp_path):  # noqa: F811
    """A worker without a configured id (a Kubernetes pod) takes a generated one: the
    switch must stage under that name, or no flip would ever see it staged."""
    from cleandift.service.processes.launch_worker import build_worker

    publish(tmp_path / "reg", unet_files[0], demo_dir)
    unnamed = settings.model_copy(update={"model": str(tmp_path / "reg" / "m"),
                                          "worker_id": None})
    worker = build_worker(unnamed, extractor)
    assert worker.switch is not None and worker.switch.worker_id == worker.jobs.consumer


class Clients:
    """`n` threads sending requests; each answer recorded as (sent, received, version)."""

    def __init__(self, url: str, images: list[bytes], n: int = 3) -> None:
        self.url, self.images, self.stop = url, images, threading.Event()
        self.seen: list[tuple[float, float, str, int]] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]
        for thread in self.threads:
            thread.start()

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            k = i
            while not self.stop.is_set():
                sent = time.monotonic()
                answer = client.post("/features", files={"image": ("x.png", self.images[
                    k % len(self.images)])})
                body = answer.json()
                self.seen.append((sent, time.monotonic(), body.get("model_version", ""),
                                  answer.status_code))
                k += 3

    def wait_for(self, version: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(v == version for _, _, v, _ in self.seen):
            assert time.monotonic() < deadline, f"never served {version}: {self.seen[-3:]}"
            time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def went_back(self, new: str) -> list[tuple[float, float, str, int]]:
        """Answers of another version to requests sent after the first answer of `new`."""
        first = min(received for _, received, v, _ in self.seen if v == new)
        return [s for s in self.seen if s[0] > first and s[2] != new]


def _slowed(worker, seconds: float) -> None:
    """This worker loads new versions `seconds` later than the other (a slower GPU)."""
    watcher, load = worker.watcher, worker.watcher.load

    def slow(version_dir: Path):
        time.sleep(seconds)
        return load(version_dir)

    watcher.load = slow


def _broken(worker) -> None:
    def fail(version_dir: Path):
        raise RuntimeError(f"cannot load {version_dir.name} here (out of memory)")

    worker.watcher.load = fail


@pytest.mark.integration
@pytest.mark.parametrize("second", ["slow", "broken"])
def test_no_request_sent_after_a_new_answer_gets_the_old_version(
        settings, demo_dir, unet_files, tmp_path, second):  # noqa: F811
    reg = tmp_path / "reg"
    publish(reg, unet_files[0], demo_dir)
    watched = settings.model_copy(update={"model": str(reg / "m"), "reload_poll_s": 0.1,
                                          "visibility_timeout_s": 2.0})
    extractor = load_extractor(reg / "m")
    images = [encode(textured_image(160, 120, seed), "PNG") for seed in range(30)]
    with ApiServer(watched) as api, WorkerThread(watched, extractor) as fast, \
            WorkerThread(watched, extractor) as other:
        with httpx.Client(base_url=api.url, timeout=60) as client:
            wait_ready(client)
        if second == "slow":
            _slowed(other.worker, 3.0)
        else:
            _broken(other.worker)
        clients = Clients(api.url, images)
        try:
            clients.wait_for("v1")
            publish(reg, unet_files[1], demo_dir)
            clients.wait_for("v2")
            time.sleep(4.0)  # the slow worker's load ends in this window
        finally:
            clients.finish()
        ready = other.worker.lease.ready()
    assert {status for *_, status in clients.seen} == {200}
    assert clients.went_back("v2") == []
    if second == "broken":  # it stays out of the switch, and says so
        assert not ready[0] and "v2" in ready[1], ready
    assert fast.worker.model.current.info.version == "v2"


def test_a_worker_left_behind_too_long_stops_to_restart_at_the_live_version(fleet, settings):
    """It failed v2, the fleet serves v2: it claims nothing; past the switch timeout it
    stops (its restart loads v2 alone, which fits where two versions side by side did not)."""
    from types import SimpleNamespace

    from cleandift.service.worker.claiming import Claimer, LeftBehind

    r, keys, (a, b) = fleet
    a.live("v1")
    b.failed("v2")
    a.stage("v2", "v1")

    class Jobs:
        consumer = "b"

        def claim(self, count, block_ms):
            raise AssertionError("a worker out of the fleet claims nothing")

    old = SimpleNamespace(info=SimpleNamespace(version="v1"))
    holder = SimpleNamespace(current=old, get=lambda v: old if v in (None, "v1") else None)
    claimer = Claimer(Jobs(), settings.model_copy(update={"switch_timeout_s": 0.3}),
                      SimpleNamespace(), holder, b, lambda call, default: call())
    assert claimer.next() == ([], "v2") and claimer.out_of_fleet() == "v2"
    time.sleep(0.4)
    with pytest.raises(LeftBehind, match="serves v2"):
        claimer.next()
