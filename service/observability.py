"""A process's logging and tracing, as its settings say: the API's and the worker's
processes call this first (below both, so the API layer never reaches into the
composition root for it)."""

from __future__ import annotations

from cleandift.settings import Settings


def configure_process(settings: Settings, service_name: str) -> None:
    """Logging and tracing of this process, as the settings say."""
    from .logs import configure_logging
    from .tracing import configure_tracing

    configure_logging(settings.log_level, settings.log_format)
    configure_tracing(settings.tracing, service_name)
