"""External programs some tests drive (CI installs them; elsewhere those tests skip)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

SHOTS = Path(os.environ.get("CLEANDIFT_SCREENSHOTS", "/tmp"))  # where browser tests save


def require(program: str, install: str, *, path: str | None = None) -> str:
    """The program's path (given, on PATH, or beside this Python: a venv's console
    scripts need no activation); in CI its absence fails the test, elsewhere it skips it
    and says how to install it."""
    import pytest

    beside = Path(sys.executable).parent / program
    found = path or shutil.which(program) or (str(beside) if beside.is_file() else None)
    if found is None and os.environ.get("CI"):
        pytest.fail(f"CI installs {program} ({install})")
    if found is None:
        pytest.skip(f"{program} is not installed ({install})")
    return found
