"""The documentation follows the code: every module has its line in docs/architecture.md."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cleandift", "service", "trainer", "bench")


def test_architecture_page_lists_every_module_once():
    page = (ROOT / "docs" / "architecture.md").read_text()
    listed = re.findall(r"^\| `([\w/]+\.py)` \|", page, re.M)
    modules = sorted(str(p.relative_to(ROOT)) for pkg in PACKAGES
                     for p in (ROOT / pkg).rglob("*.py"))
    assert sorted(listed) == modules
