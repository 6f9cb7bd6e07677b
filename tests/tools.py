"""External programs some tests drive (CI installs them; elsewhere those tests skip)."""

from __future__ import annotations

import os
import shutil

import pytest


def require(program: str, debian_package: str) -> str:
    """The program's path; in CI its absence fails the test, elsewhere it skips it."""
    found = shutil.which(program)
    if found is None and os.environ.get("CI"):
        pytest.fail(f"CI installs {program} (Debian's {debian_package} package)")
    if found is None:
        pytest.skip(f"{program} not installed (apt-get install {debian_package})")
    return found
