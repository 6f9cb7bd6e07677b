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
