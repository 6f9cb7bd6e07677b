"""The reliability suite's fault matrix: each of its tests adds a row (`record`), and the
run writes them all to $CLEANDIFT_RELIABILITY_REPORT (JSON) at its end. The suite runs on
pytest-xdist workers: each hands its rows to the controller, which writes the one file
(a worker writing it would overwrite the other's rows)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROWS: list[dict] = []
KEY = "reliability_rows"


@pytest.fixture
def record():
    """record(fault=..., sent=..., succeeded=..., refused=..., errors=..., lost=..., ...)."""

    def add(**row) -> None:
        ROWS.append(row)

    return add


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller writes the file
        workeroutput[KEY] = json.dumps(ROWS)
        return
    target = os.environ.get("CLEANDIFT_RELIABILITY_REPORT")
    if target and ROWS:  # by fault: the same order whichever worker finished first
        rows = sorted(ROWS, key=lambda row: str(row.get("fault", "")))
        Path(target).write_text(json.dumps(rows, indent=2) + "\n")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist: a worker finished; its rows join the controller's."""
    ROWS.extend(json.loads(getattr(node, "workeroutput", {}).get(KEY, "[]")))
