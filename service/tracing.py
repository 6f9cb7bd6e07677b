"""OpenTelemetry tracing, off unless configured (`CLEANDIFT_TRACING=otlp|console`).

The API opens a span per request and one per stage it runs (parse, enqueue, wait,
respond); the trace context travels inside the job (`JobSpec.trace`, W3C traceparent),
and the worker records its stages (queue wait, pre, forward, post) as children of the
request's span. A worker runs many requests in one batch, so its spans are recorded per
job after the batch, with the batch's timestamps.

Only the OpenTelemetry API is used outside `configure_tracing`: without a configured SDK
every call here is a no-op and no context is carried.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Span

TRACER = "cleandift"
SpanKind = trace.SpanKind


def configure_tracing(exporter: str, service_name: str) -> None:
    """Install the SDK's provider with an OTLP (standard OTEL_* variables) or console
    exporter; needs the `tracing` extra."""
    if exporter == "off":
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        raise SystemExit("CLEANDIFT_TRACING needs the tracing extra: "
                         "pip install 'cleandift-service[tracing]'") from exc
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        span_exporter: Any = OTLPSpanExporter()
    else:
        span_exporter = ConsoleSpanExporter()
    # A name the user gave (OTEL_SERVICE_NAME, or service.name in OTEL_RESOURCE_ATTRIBUTES,
    # both read by the SDK's resource detector) wins over our default one.
    named = {} if user_service_name() else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(named))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)


def user_service_name() -> str | None:
    if os.environ.get("OTEL_SERVICE_NAME"):
        return os.environ["OTEL_SERVICE_NAME"]
    for pair in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = pair.partition("=")
        if key.strip() == "service.name" and value.strip():
            return value.strip()
    return None


def mark_error(current: Span, description: str) -> None:
    current.set_status(trace.Status(trace.StatusCode.ERROR, description))


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER)


@contextmanager
def span(name: str, kind: trace.SpanKind = trace.SpanKind.INTERNAL, **attributes: Any
         ) -> Iterator[Span]:
    with tracer().start_as_current_span(name, kind=kind, attributes=attributes) as current:
        yield current


def annotate(**attributes: Any) -> None:
    """Attributes on the current span (the request's, in a route)."""
    trace.get_current_span().set_attributes(attributes)


def server_span(name: str, headers: Mapping[str, str], **attributes: Any) -> Any:
    """A request's root span, continuing the client's trace when it sent a traceparent."""
    return tracer().start_as_current_span(name, context=propagate.extract(headers),
                                          kind=trace.SpanKind.SERVER, attributes=attributes)


def carrier() -> dict[str, str]:
    """The current trace context to put in a job (empty while tracing is off)."""
    out: dict[str, str] = {}
    propagate.inject(out)
    return out


def record_stages(context: Mapping[str, str], stages: Sequence[tuple[str, float, float]],
                  **attributes: Any) -> None:
    """A job's worker side: one CONSUMER `process` span (OpenTelemetry's messaging
    conventions), a child of the request's `enqueue` span carried in the job, over the
    stages (name, start, end in epoch seconds) as its children."""
    if not context or not stages:
        return
    t = tracer()
    first, last = min(s[1] for s in stages), max(max(s[1], s[2]) for s in stages)
    process = t.start_span("process", context=propagate.extract(context),
                           kind=trace.SpanKind.CONSUMER, start_time=int(first * 1e9),
                           attributes={"messaging.system": "redis",
                                       "messaging.operation.type": "process",
                                       "messaging.operation.name": "process", **attributes})
    parent = trace.set_span_in_context(process)
    for name, start, end in stages:
        recorded = t.start_span(name, context=parent, start_time=int(start * 1e9),
                                attributes=attributes)
        recorded.end(end_time=int(max(start, end) * 1e9))
    process.end(end_time=int(last * 1e9))
