"""Log lines carry the request id (from the request's context or given per line), as
text or as one JSON object per line."""

from __future__ import annotations

import io
import json
import logging

from cleandift.service.logs import TEXT_FORMAT, JsonFormatter, RequestIdFilter, request_id_var


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test-logs-{id(stream)}")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_json_lines_carry_the_request_id_of_the_context():
    logger, stream = capture(JsonFormatter())
    token = request_id_var.set("req-1")
    try:
        logger.info("decoded %d pixels", 42)
    finally:
        request_id_var.reset(token)
    logger.warning("job failed", extra={"request_id": "req-2"})  # a worker names it
    logger.info("outside any request")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("crashed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["req-1", "req-2", "-", "-"]
    assert lines[0]["message"] == "decoded 42 pixels" and lines[0]["level"] == "INFO"
    assert "ValueError: boom" in lines[3]["exception"]


def test_text_lines_carry_it_too():
    logger, stream = capture(logging.Formatter(TEXT_FORMAT))
    token = request_id_var.set("abc")
    try:
        logger.info("hello")
    finally:
        request_id_var.reset(token)
    assert "[abc] hello" in stream.getvalue()


def test_every_request_has_one_access_line_in_text_and_json(settings):
    """Through a real API (no worker): a 401, a 503 and a probe; the access line carries
    method, path, status, duration, model and the request id the answer has."""
    import httpx
    from pydantic import SecretStr

    from tests.service.service_helpers import ApiServer

    text_handler = logging.StreamHandler(io.StringIO())
    json_handler = logging.StreamHandler(io.StringIO())
    for handler, formatter in ((text_handler, logging.Formatter(TEXT_FORMAT)),
                               (json_handler, JsonFormatter())):
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(formatter)
        handler.setLevel(logging.DEBUG)
    access = logging.getLogger("cleandift.access")
    access.addHandler(text_handler)
    access.addHandler(json_handler)
    level, access.level = access.level, logging.DEBUG
    keyed = settings.model_copy(update={"api_key": SecretStr("k" * 32)})
    try:
        with ApiServer(keyed) as api, httpx.Client(base_url=api.url) as http:
            refused = http.post("/features", files={"image": ("a.jpg", b"x")})
            unserved = http.post("/features", headers={"X-API-Key": "k" * 32},
                                 files={"image": ("a.jpg", b"x")})
            probe = http.get("/healthz")
    finally:
        access.removeHandler(text_handler)
        access.removeHandler(json_handler)
        access.level = level
    lines = [json.loads(line) for line in json_handler.stream.getvalue().splitlines()]
    by_id = {line["request_id"]: line for line in lines}
    for answer, status, at in ((refused, 401, "INFO"), (unserved, 503, "INFO"),
                               (probe, 200, "DEBUG")):
        assert answer.status_code == status
        line = by_id[answer.headers["x-request-id"]]
        assert line["level"] == at and line["logger"] == "cleandift.access"
        assert line["http"]["status"] == status and line["http"]["duration_ms"] >= 0
        assert line["http"]["method"] == answer.request.method
        assert line["http"]["path"] == answer.request.url.path
    text = text_handler.stream.getvalue()
    assert f"[{unserved.headers['x-request-id']}] POST /features 503 " in text
