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


def _operations() -> dict[str, dict]:
    from cleandift.service.api.app import create_app
    from cleandift.settings import Settings

    schema = create_app(Settings(redis_url="redis://127.0.0.1:1/0")).openapi()
    return {f"{method.upper()} {path}": op for path, item in schema["paths"].items()
            for method, op in item.items()}


def _parameters(op: dict) -> set[str]:
    names = {p["name"] for p in op.get("parameters", [])}
    for media in op.get("requestBody", {}).get("content", {}).values():
        names |= set(media["schema"].get("properties", {}))
    return names


def _section(page: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", page, re.M | re.S)
    assert match, f"docs/api.md has no section '## {heading}'"
    return match.group(1)


def test_http_reference_agrees_with_the_openapi_schema():
    page = (ROOT / "docs" / "api.md").read_text()
    for name, op in _operations().items():
        assert name in page, f"docs/api.md does not mention {name}"
        params = _parameters(op)
        if not params:
            continue
        section = _section(page, name)
        documented = set(re.findall(r"^\| `(\w+)` \| (?:body|query|path)", section, re.M))
        assert documented == params, f"{name}: documented {documented}, schema {params}"
        for status in op["responses"]:
            assert re.search(rf"\b{status}\b", section), f"{name}: status {status} undocumented"
        for response in op["responses"].values():
            for header in response.get("headers", {}):
                assert f"`{header}`" in page, f"{name}: header {header} undocumented"


def test_user_docs_link_only_inside_the_repository():
    """README and docs/ are what users read: every relative link resolves in the repository
    (no links into the development workspace, no dead links)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{page.name}: {target}"
