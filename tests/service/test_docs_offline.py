"""/docs and /redoc render with the network blocked (Chromium, driven by Playwright): every
script, style and font they need comes from the API itself."""

from __future__ import annotations

from urllib.parse import urlsplit

from tests.service.service_helpers import ApiServer
from tests.tools import SHOTS


def _offline_page(browser, api_url: str):
    """A page whose requests anywhere but the API are refused (and recorded)."""
    page = browser.new_page()
    refused: list[str] = []
    local = urlsplit(api_url).netloc

    def route(route) -> None:
        if urlsplit(route.request.url).netloc == local:
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    page.route("**/*", route)
    return page, refused


def test_docs_and_redoc_render_offline(settings, browser):
    with ApiServer(settings) as api:
        page, refused = _offline_page(browser, api.url)
        page.goto(api.url + "/docs")
        page.wait_for_selector(".swagger-ui .info .title", timeout=20_000)
        assert "CleanDIFT feature service" in page.inner_text(".swagger-ui .info .title")
        page.wait_for_selector("#operations-default-features, .opblock", timeout=20_000)
        page.screenshot(path=str(SHOTS / "cleandift-docs-offline.png"))
        page.goto(api.url + "/redoc")
        page.wait_for_selector("h1", timeout=20_000)
        assert "CleanDIFT feature service" in page.inner_text("h1")
        page.screenshot(path=str(SHOTS / "cleandift-redoc-offline.png"))
    # Nothing else was even asked of the internet: the one exception is the "API docs by
    # Redocly" footer logo of ReDoc's bundle, an image whose absence changes nothing.
    assert [url for url in refused if not url.endswith("/redoc/logo-mini.svg")] == []
