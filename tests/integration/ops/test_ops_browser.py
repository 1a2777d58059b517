"""The status page in a real browser: headless Chromium opens a running demo's page, sees values change and
sparklines drawn, raises no JavaScript error, and leaves a screenshot in tests/artifacts/."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import pytest

from tests.integration.ops.cdp import chromium_binary, headless_chromium
from tests.integration.ops.conftest import RunningGateway

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.skipif(chromium_binary() is None, reason="chromium not installed (apt-get install chromium)"),
]

VALUES_JS = "JSON.stringify([...document.querySelectorAll('.pt .pval')].map(e => e.textContent))"
#: the parts of point rows that stick out of their device card (by more than half a pixel), as "point: class"
SPILLS_JS = """[...document.querySelectorAll('.device-card')].flatMap(card => {
  const box = card.getBoundingClientRect();
  return [...card.querySelectorAll('.pt > *')].filter(el => {
    const r = el.getBoundingClientRect();
    return r.right > box.right + 0.5 || r.left < box.left - 0.5;
  }).map(el => el.closest('.pt').dataset.point + ': ' + el.getAttribute('class'));
})"""
SUMMARY_JS = "document.querySelector('#summary .card:nth-child(2)')"


async def test_status_page_shows_live_values_and_plots(demo_gateway: RunningGateway, tmp_path: Path) -> None:
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    async with headless_chromium(profile) as page:
        await page.call("Runtime.enable")
        await page.call(
            "Emulation.setDeviceMetricsOverride", width=1440, height=1000, deviceScaleFactor=1, mobile=False
        )
        await page.call("Page.enable")
        await page.call("Page.navigate", url=demo_gateway.url + "/")
        await page.wait_for("document.readyState === 'complete' && !!document.querySelector('.pt[data-point]')")

        title = await page.evaluate("document.querySelector('h1').textContent")
        assert title == "Demo Tower, simulated"
        with urllib.request.urlopen(demo_gateway.url + "/api/status") as resp:
            status = json.loads(resp.read())
        rows = await page.evaluate("document.querySelectorAll('.pt[data-point]').length")
        assert rows == len(status["points"]) >= 36  # every point of the demo building has its row

        first = await page.evaluate(VALUES_JS)
        # live update: at least one shown value differs from the first snapshot (the demo polls every second)
        await page.wait_for(f"{VALUES_JS} !== {first!r}", timeout=10)

        # a plot is drawn: a sparkline with at least 3 vertices, spanning the box's width, and visible on screen
        await page.wait_for("document.querySelectorAll('.pt[data-plotted]').length >= 36", timeout=10)
        co2_vertices = (
            "document.querySelector('.pt[data-point=\"zone1.co2\"] svg.spark polyline')"
            ".getAttribute('points').trim().split(/\\s+/).length"
        )
        await page.wait_for(f"{co2_vertices} >= 3", timeout=10)
        box = await page.evaluate(
            "(() => { const r = document.querySelector('.pt[data-point=\"zone1.co2\"] svg.spark polyline')"
            ".getBoundingClientRect(); return [r.width, r.height]; })()"
        )
        assert box[0] > 50 and box[1] > 1

        # the other panels render from the server: eight devices online, readiness badge green
        states = await page.evaluate(
            "[...document.querySelectorAll('#devices tbody tr .badge')].map(b => b.textContent)"
        )
        assert states == ["online"] * len(status["devices"])
        assert await page.evaluate("document.querySelector('#health .badge').textContent") == "ready"

        # let the section refresh (every 5 s) run once, and check it kept the page whole
        await page.wait_for("document.querySelector('#devices') && window.performance.now() > 6000", timeout=15)
        assert await page.evaluate("document.querySelectorAll('.pt[data-plotted]').length") >= 36

        # a fresh demo is healthy: every point good (the virtual point reads its initial value; the once-a-minute
        # building aggregate is pending, not late), not amber, and no start-up rule message left as a problem
        assert await page.evaluate(f"{SUMMARY_JS}.querySelector('.label').textContent") == "Points good"
        assert await page.evaluate(f"{SUMMARY_JS}.className") == "card ok"
        assert await page.evaluate("document.querySelectorAll('#rules .problems li').length") == 0
        # values fit their cards, on a laptop and on a phone
        assert await page.evaluate(SPILLS_JS) == []
        await page.call("Emulation.setDeviceMetricsOverride", width=375, height=800, deviceScaleFactor=1, mobile=True)
        assert await page.evaluate(SPILLS_JS) == []
        await page.call(
            "Emulation.setDeviceMetricsOverride", width=1440, height=1000, deviceScaleFactor=1, mobile=False
        )

        # a reloaded page starts its plots from /api/history, not from scratch
        await page.call("Page.reload")
        await page.wait_for("!!document.querySelector('.pt[data-point=\"zone1.co2\"][data-plotted]')")
        assert await page.evaluate(co2_vertices) >= 4

        errors = [e for e in page.events if e["method"] == "Runtime.exceptionThrown"]
        assert errors == []

        height = await page.evaluate("Math.ceil(document.documentElement.scrollHeight)")
        await page.call(
            "Emulation.setDeviceMetricsOverride", width=1440, height=height, deviceScaleFactor=1, mobile=False
        )
        shot = await page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / "status-page.png"
    target.write_bytes(base64.b64decode(shot["data"]))
    assert target.stat().st_size > 20_000  # a rendered page, not a blank one
