"""Metrics that add up across processes, request ids, traces across the queue, the wake-up
call for workers scaled to zero, and what OpenAPI declares."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from cleandift.service import tracing
from cleandift.service.metrics import ApiMetrics, QueueState, WorkerMetrics
from cleandift.service.processes.redis_server import free_port
from cleandift.service.queue.keys import Keys
from tests.service.service_helpers import ApiServer, WorkerThread, metric, running_service
from tests.tools import require

pytestmark = pytest.mark.integration
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def api_processes(settings, tmp_path):
    """`cleandift api` with two uvicorn processes, as compose and k8s run it."""
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "counter_1.db").write_bytes(b"stale")  # an earlier run's file
    with two_api_processes(settings, CLEANDIFT_METRICS_DIR=str(tmp_path / "metrics")) as url:
        yield url


@contextmanager
def two_api_processes(settings, **env: str):
    port = free_port()
    env = {**os.environ, "CLEANDIFT_REDIS_URL": settings.redis_url,
           "CLEANDIFT_QUEUE_PREFIX": settings.queue_prefix, "CLEANDIFT_PORT": str(port),
           "CLEANDIFT_API_WORKERS": "2", **env}
    proc = subprocess.Popen([sys.executable, "-m", "cleandift.cli", "api"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz/api").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the API did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_api_removes_the_metrics_directory_it_made(settings, tmp_path):
    with two_api_processes(settings, TMPDIR=str(tmp_path)):
        assert len(list(tmp_path.glob("cleandift-metrics-*"))) == 1
    assert list(tmp_path.glob("cleandift-metrics-*")) == []


def test_metrics_of_several_api_processes_add_up(api_processes):
    """Every request counted once, whichever process answers the scrape."""
    for _ in range(30):  # a new connection each: the processes share the accepts
        assert httpx.get(api_processes + "/healthz").status_code == 200
    for _ in range(8):
        text = httpx.get(api_processes + "/metrics").text
        assert metric(text, "cleandift_requests_total", route="/healthz", status="200") == 30
        assert metric(text, "cleandift_request_duration_seconds_count", route="/healthz") == 30
    assert metric(text, "cleandift_queue_depth") == 0 and "cleandift_queue_depth{" in text


def promtool() -> str:
    return require("promtool", "apt-get install prometheus")


def test_promtool_accepts_the_api_and_worker_metrics(settings, extractor, jpeg):
    check = promtool()
    with running_service(settings, extractor) as (client, threads):
        assert client.post("/features", files={"image": ("a.jpg", jpeg, "image/jpeg")},
                           data={"layers": "us6"}).status_code == 200
        texts = [client.get("/metrics").content, threads[0].worker.metrics.render()]
    for text in texts:
        run = subprocess.run([check, "check", "metrics"], input=text, capture_output=True)
        assert run.returncode == 0, run.stdout.decode() + run.stderr.decode()


def test_gpu_gauges_come_from_the_reader():
    metrics = WorkerMetrics()
    assert metrics.value("cleandift_gpu_memory_allocated_bytes", device="cuda:0") == 0
    metrics.watch_gpu(lambda: {"allocated": 3e9, "reserved": 4e9, "total": 8e10,
                               "utilization": 0.5}, "cuda:0")
    assert metrics.value("cleandift_gpu_memory_allocated_bytes", device="cuda:0") == 3e9
    assert metrics.value("cleandift_gpu_memory_total_bytes", device="cuda:0") == 8e10
    assert metrics.value("cleandift_gpu_utilization_ratio", device="cuda:0") == 0.5


def test_queue_gauges_are_read_at_scrape_time_not_kept():
    metrics = ApiMetrics()
    first = metrics.render(QueueState(depth=3, pending=1, workers_alive=2,
                                      model=("m", "v1"))).decode()
    later = metrics.render(QueueState(workers_alive=0, model=("m", "v2"))).decode()
    assert metric(first, "cleandift_queue_depth") == 3
    assert metric(first, "cleandift_model_info", version="v1") == 1
    assert "queue_depth" not in later  # Redis unreachable: no stale figure
    assert 'version="v1"' not in later and metric(later, "cleandift_model_info", version="v2")


def test_request_id_is_accepted_or_made_and_on_every_answer(service, jpeg):
    given = service.get("/healthz", headers={"X-Request-ID": "client-42"})
    assert given.headers["x-request-id"] == "client-42"
    made = service.get("/v1/models").headers["x-request-id"]
    assert len(made) == 32 and made != service.get("/healthz").headers["x-request-id"]
    bad = service.get("/healthz", headers={"X-Request-ID": "x" * 500})
    assert bad.headers["x-request-id"] != "x" * 500
    refused = service.post("/features", content=b"{", headers={
        "Content-Type": "application/json", "X-Request-ID": "broken-1"})
    assert refused.status_code == 400 and refused.headers["x-request-id"] == "broken-1"
    assert service.get("/nowhere").headers["x-request-id"]


def test_a_trace_follows_the_request_through_the_queue(settings, extractor, jpeg, monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", lambda: provider.get_tracer(tracing.TRACER))
    # The global provider too: FastAPI's own tracing (on by default in 0.165+) uses it,
    # and a second SERVER span per request would be counted below.
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    with running_service(settings, extractor) as (client, _):
        exporter.clear()
        assert client.get("/readyz").status_code == client.get("/healthz").status_code == 200
        answer = client.post("/features", files={"image": ("a.jpg", jpeg, "image/jpeg")},
                             data={"layers": "us6"}, headers={"traceparent": TRACEPARENT})
        assert answer.status_code == 200
        assert client.get("/nowhere").status_code == 404
        deadline = time.monotonic() + 10
        while "post" not in {s.name for s in exporter.get_finished_spans()}:
            assert time.monotonic() < deadline, "the worker's spans never came"
            time.sleep(0.05)
    spans = [s for s in exporter.get_finished_spans()
             if s.context.trace_id == int(TRACEPARENT.split("-")[1], 16)]
    names = {s.name for s in spans}
    assert {"POST /features", "parse", "enqueue", "wait", "respond", "queue wait", "pre",
            "forward", "post"} <= names
    root = next(s for s in spans if s.name == "POST /features")
    assert root.attributes["cleandift.request_id"] == answer.headers["x-request-id"]
    assert root.attributes["http.route"] == "/features"
    servers = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    # One per request, no probe's span; a path no route matched is named by its method.
    assert [s.name for s in servers] == ["POST /features", "GET"]
    enqueue = next(s for s in spans if s.name == "enqueue")
    assert enqueue.kind == SpanKind.PRODUCER and enqueue.attributes["messaging.system"] == "redis"
    process = next(s for s in spans if s.name == "process")  # the worker's side
    assert process.kind == SpanKind.CONSUMER and process.parent.span_id == enqueue.context.span_id
    assert process.attributes["messaging.operation.type"] == "process"
    assert {s.name for s in spans if s.parent and s.parent.span_id == root.context.span_id
            } >= {"parse", "enqueue"} and not any(s.name.startswith("fastapi") for s in spans)
    for name in ("queue wait", "forward", "post"):
        stage = next(s for s in spans if s.name == name)
        assert stage.parent.span_id == process.context.span_id
        assert root.start_time <= stage.start_time <= stage.end_time <= root.end_time


def test_without_workers_the_api_stays_ready_answers_503_and_calls_for_workers(
        settings, extractor, jpeg):
    client = redis.Redis.from_url(settings.redis_url)
    wake = Keys(settings.queue_prefix).wake
    with ApiServer(settings) as api, httpx.Client(base_url=api.url) as http:
        assert http.get("/readyz/api").status_code == 200
        assert http.get("/readyz").status_code == 503
        answer = http.post("/features", files={"image": ("a.jpg", jpeg, "image/jpeg")})
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
        unread = http.post("/correspond", content=b"--x\r\nnot a form at all",
                           headers={"content-type": "multipart/form-data; boundary=x"})
        assert unread.status_code == 503, unread.text  # refused before the body is read
        assert client.llen(wake) >= 1
        with WorkerThread(settings, extractor):
            deadline = time.monotonic() + 20
            while client.exists(wake):
                assert time.monotonic() < deadline, "the worker never answered the call"
                time.sleep(0.05)


def test_openapi_declares_auth_stable_operation_ids_and_headers(service):
    spec = service.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schemes)
    assert {"HTTPBearer": []} in spec["paths"]["/features"]["post"]["security"]
    ids = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert ids == {"features", "correspond", "models", "model", "healthz", "readyz", "readyz_api"}
    ok = spec["paths"]["/features"]["post"]["responses"]
    assert {"X-Model-Version", "X-Request-ID"} <= set(ok["200"]["headers"])
    assert "Retry-After" in ok["503"]["headers"]


@pytest.mark.parametrize(("env", "name"), [
    ({}, "cleandift-api"),
    ({"OTEL_SERVICE_NAME": "feat"}, "feat"),
    ({"OTEL_RESOURCE_ATTRIBUTES": "team=v, service.name=feat2"}, "feat2"),
])
def test_the_users_service_name_wins_over_ours(env, name, monkeypatch):
    pytest.importorskip("opentelemetry.sdk")
    for key in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    installed = []
    monkeypatch.setattr(trace, "set_tracer_provider", installed.append)
    tracing.configure_tracing("console", "cleandift-api")
    installed[0].shutdown()  # its export thread
    assert installed[0].resource.attributes["service.name"] == name


def test_a_server_error_marks_the_span_as_failed():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("s") as current:
        tracing.mark_error(current, "503")
    [span] = exporter.get_finished_spans()
    assert span.status.status_code == trace.StatusCode.ERROR
