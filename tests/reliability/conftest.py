"""Reliability suite: real processes, real Redis, bounded in time. Each test adds a row to
the fault matrix, written to $CLEANDIFT_RELIABILITY_REPORT (JSON) at the end of the run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROWS: list[dict] = []


@pytest.fixture
def record():
    """record(fault=..., sent=..., succeeded=..., refused=..., errors=..., lost=..., ...)."""

    def add(**row) -> None:
        ROWS.append(row)

    return add


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("CLEANDIFT_RELIABILITY_REPORT")
    if target and ROWS:
        Path(target).write_text(json.dumps(ROWS, indent=2) + "\n")
