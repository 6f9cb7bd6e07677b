"""Each process's start: logging and tracing configured from the settings, as `api`,
`worker` and `serve` do before anything else (a broken import here stops every process)."""

from __future__ import annotations

import logging

from cleandift.service.observability import configure_process
from cleandift.settings import Settings


def test_a_process_configures_its_logging_and_tracing():
    configure_process(Settings(log_level="WARNING", log_format="json", tracing="off"),
                      "cleandift-test")
    assert logging.getLogger().level == logging.WARNING
    configure_process(Settings(), "cleandift-test")
