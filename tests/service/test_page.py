"""The correspondence page in a real browser (Debian's Chromium, driven by Playwright)."""

from __future__ import annotations

import pytest

from tests.corpus import encode, textured_image
from tests.service.service_helpers import running_service
from tests.tools import SHOTS

pytestmark = pytest.mark.integration


def test_pick_click_match_switch_layer_and_error(settings, extractor, browser, tmp_path):
    source, target = tmp_path / "source.png", tmp_path / "target.jpg"
    textured_image(320, 240, 1).save(source)
    textured_image(320, 240, 1).resize((480, 360)).save(target, quality=95)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(encode(textured_image(64, 48, 4), "JPEG")[:200])
    with running_service(settings, extractor) as (http, _):
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(str(http.base_url))
        page.wait_for_selector("#model:has-text('cleandift-demo')")
        page.set_input_files("#source-file", str(source))
        page.set_input_files("#target-file", str(target))
        canvas = page.locator("#source-canvas")
        canvas.wait_for()
        page.wait_for_function("document.getElementById('source-canvas').width > 0")
        box = canvas.bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.4)
        match = page.locator("#target-marks circle.match").first
        match.wait_for()
        point = page.locator("#source-marks circle.point").first
        sx, sy = float(point.get_attribute("data-x")), float(point.get_attribute("data-y"))
        tx, ty = float(match.get_attribute("data-x")), float(match.get_attribute("data-y"))
        # The marker sits where the API says: ask the API the same question directly.
        api = http.post("/correspond", files={"source": source.read_bytes(),
                                              "target": target.read_bytes()},
                        data={"points": f"[[{sx}, {sy}]]", "layer": "us6"}).json()
        assert [tx, ty] == api["matches"][0]["target"]
        assert abs(tx - (sx + 0.5) * 1.5 + 0.5) < 30 and abs(ty - (sy + 0.5) * 1.5 + 0.5) < 30
        assert page.locator("#status").inner_text().startswith("cleandift-demo")
        page.screenshot(path=str(SHOTS / "cleandift-page.png"), full_page=True)

        page.select_option("#layer", "us9")
        page.wait_for_function(
            "document.querySelector('#target-marks circle.match') &&"
            " document.getElementById('status').innerText.includes('inference')")
        page.click("#source-pca")
        page.wait_for_selector("#pca-title:has-text('32×32×32')")

        page.set_input_files("#target-file", str(bad))
        error = page.locator("#error")
        error.wait_for(state="visible")
        page.wait_for_function("document.getElementById('error').innerText.includes('400')")
        assert "image" in error.inner_text().lower()
        page.close()
