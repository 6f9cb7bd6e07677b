"""The worker's store of large results and the port that serves them."""

from __future__ import annotations

import time

import httpx
import numpy as np

from cleandift.service.worker.results import ResultStore
from cleandift.service.worker.server import serve_worker_http


def body(n: int) -> memoryview:
    return np.arange(n, dtype=np.uint8).data


def test_a_result_is_fetched_once_with_its_token():
    store = ResultStore(max_bytes=1000, hold_s=30)
    token = store.put("job", body(100))
    assert token and store.used == 100
    assert store.take("job", "wrong") is None and len(store) == 1
    assert bytes(store.take("job", token)) == bytes(body(100))
    assert store.take("job", token) is None and store.used == 0


def test_the_store_is_bounded_and_forgets_what_nobody_fetched():
    store = ResultStore(max_bytes=250, hold_s=0.05)
    assert store.put("a", body(100)) and store.put("b", body(100))
    assert store.put("c", body(100)) is None  # full: the caller sends it through Redis
    time.sleep(0.1)
    assert store.put("d", body(200)) is not None  # the expired ones were dropped
    assert store.used == 200


def test_the_port_serves_results_and_probes():
    store = ResultStore(max_bytes=10**6, hold_s=30)
    facts = {"workers": 1, "model": "m", "model_version": "v1", "models": {"m": "v1"}}
    server = serve_worker_http(0, lambda: b"metrics\n", lambda: (True, "ready"),
                               lambda: (True, "ok"), results=store, facts=lambda: facts)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        token = store.put("j1", body(5000))
        with httpx.Client(base_url=base) as client:  # one kept-alive connection
            answer = client.get("/results/j1", params={"token": token})
            assert answer.status_code == 200 and answer.content == bytes(body(5000))
            assert answer.headers["content-length"] == "5000"
            gone = client.get("/results/j1", params={"token": token})
            assert gone.status_code == 404
            assert gone.headers["content-type"] == "application/problem+json"
            # The API's /readyz fields, for this worker's model; the API's health format.
            assert client.get("/readyz").json() == {"status": "ready", **facts,
                                                    "detail": "ready"}
            assert client.get("/healthz").json() == {"status": "ok", "detail": "ok"}
            assert client.get("/nowhere").json()["status"] == 404
            assert client.get("/metrics").text == "metrics\n"
    finally:
        server.shutdown()


def test_the_api_fetcher_reads_results_and_reports_failures():
    import asyncio

    import pytest

    from cleandift.service.api.fetch import FetchFailed, ResultFetcher
    from cleandift.service.messages import ResultMeta
    from cleandift.service.processes.redis_server import free_port

    store = ResultStore(max_bytes=10**8, hold_s=30)
    server = serve_worker_http(0, lambda: b"", lambda: (True, ""), lambda: (True, ""),
                               results=store)
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def meta(job: str, n: int) -> ResultMeta:
        token = store.put(job, body(n))
        return ResultMeta(job_id=job, location=f"{base}/results/{job}", token=token or "",
                          nbytes=n)

    async def scenario() -> None:
        fetcher = ResultFetcher(timeout_s=10)
        big = meta("big", 3_000_000)
        assert bytes(await fetcher.fetch(big)) == bytes(body(3_000_000))
        # The same kept-alive socket again; then one the worker closed while it sat idle.
        assert bytes(await fetcher.fetch(meta("small", 10))) == bytes(body(10))
        for sockets in fetcher._idle.values():
            for sock in sockets:
                sock.shutdown(2)  # the far side hangs up (as a restarted worker would)
        assert bytes(await fetcher.fetch(meta("again", 10))) == bytes(body(10))
        with pytest.raises(FetchFailed, match="404"):
            await fetcher.fetch(big)  # fetched already
        gone = ResultMeta(job_id="x", location=f"http://127.0.0.1:{free_port()}/results/x",
                          token="t", nbytes=1)
        with pytest.raises(FetchFailed):
            await fetcher.fetch(gone)  # nobody listens there
        await fetcher.aclose()

    try:
        asyncio.run(scenario())
    finally:
        server.shutdown()


def test_a_job_stored_twice_is_counted_once():
    """A job run again (redelivered) stores its result again: the new body replaces the
    old one, and after the fetch nothing stays counted."""
    store = ResultStore(max_bytes=1000, hold_s=30)
    store.put("job", body(300))
    token = store.put("job", body(300))
    assert token and store.used == 300 and len(store) == 1
    assert bytes(store.take("job", token)) == bytes(body(300))
    assert store.used == 0
    assert store.put("other", body(1000))  # the whole budget is free again


def test_the_port_closes_idle_connections():
    """Each connection holds a thread: one that sends nothing is closed after the idle
    timeout (and a request on a fresh connection is still answered)."""
    import socket
    import threading

    server = serve_worker_http(0, lambda: b"m\n", lambda: (True, "ready"), lambda: (True, "ok"),
                               idle_timeout_s=0.3)
    address = ("127.0.0.1", server.server_address[1])
    before = threading.active_count()
    try:
        idle = [socket.create_connection(address, timeout=5) for _ in range(20)]
        for sock in idle:
            assert sock.recv(1) == b""  # closed by the server, not by our 5 s timeout
            sock.close()
        assert httpx.get(f"http://{address[0]}:{address[1]}/readyz").json()["status"] == "ready"
        deadline = time.monotonic() + 5
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= before  # their threads are gone
    finally:
        server.shutdown()
        server.server_close()
