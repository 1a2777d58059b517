"""What a running gateway says about itself at start and after a rule reload, through the real supervisor: a fresh
demo is all green once its first readings are in, and a refused reload is on /api/rules, the page and
``status --problems`` (with the error's file:line:col) until a reload succeeds."""

from __future__ import annotations

import argparse
import asyncio
import io
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.config.site import load_site
from gateway.http import views
from gateway.http.cli import cmd_status
from gateway.http.cli import render as render_status
from gateway.http.page import render
from gateway.http.server import create_app
from gateway.supervisor import Gateway
from tests.unit.http.conftest import demo_site


async def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
async def running() -> AsyncIterator[Callable[[Gateway], Any]]:
    started: list[tuple[asyncio.Event, asyncio.Future[None]]] = []

    async def start(gateway: Gateway) -> None:
        stop = asyncio.Event()
        started.append((stop, asyncio.ensure_future(gateway.run(stop))))
        await asyncio.wait_for(gateway.started.wait(), 10)

    yield start
    for stop, runner in started:
        stop.set()
        await asyncio.wait_for(runner, 10)


def lingering(gateway: Gateway) -> tuple[list[str], list[str]]:
    """Points neither good nor awaiting their first value, and rule problems still open."""
    data = views.overview(gateway)
    points = [p["id"] for p in data["points"] if p["quality"] != "good" and not p["awaiting"]]
    return points, data["rules"]["problems"]


async def test_a_fresh_demo_is_all_green_once_the_first_readings_are_in(
    tmp_path: Path, running: Callable[[Gateway], Any]
) -> None:
    gateway = Gateway(demo_site(), data_dir=tmp_path, http_listen="off")
    await running(gateway)
    # the engine complains while the devices' first batches come in one by one (a rate needs two readings)...
    await wait_until(lambda: lingering(gateway) == ([], []))
    data = views.overview(gateway)
    points = {p["id"]: p for p in data["points"]}
    shed = points["building.load_shed"]  # a virtual point: its `initial: false`, as a reading
    assert shed["value"] is False and shed["quality"] == "good" and shed["ts"] is not None
    # the building aggregate is sent once a minute by design: pending, not late
    assert points["building.energy_kwh_total"]["awaiting"].startswith("first sum at ")
    page = render(data)
    assert '<div class="card ok"><div class="label">Points good' in page
    assert "Recent rule problems" not in page
    terminal = io.StringIO()
    render_status(data, terminal, all_points=False)  # status --problems
    assert "every point good" in terminal.getvalue() and "recent rule problems" not in terminal.getvalue()
    # ...and what it said at start is kept as information, each marked resolved
    assert all("(resolved " in line for line in data["rules"]["resolved_problems"])


GOOD_RULES = "version: 1\npoints:\n  zone3.co2_x2: {expr: 'zone3.co2 * 2'}\n"
BAD_RULES = (
    GOOD_RULES + "rules:\n  - id: typo\n    when: zone3.co3 > 1000\n    then: [{event: {type: x, message: m}}]\n"
)


async def test_a_refused_reload_is_shown_until_a_reload_succeeds(
    tmp_path: Path, running: Callable[[Gateway], Any], capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(GOOD_RULES)
    site_file = tmp_path / "site.yaml"
    site_file.write_text(
        "version: 1\ngateway: {id: gw1, site: lab}\nhttp: {enabled: false}\nrules: [rules.yaml]\n"
        "devices:\n  - {id: zone3, driver: simulator, profile: sim-zone, seed: 13, poll: 1s}\n"
    )
    gateway = Gateway(load_site(site_file), data_dir=tmp_path / "data", http_listen="off")
    await running(gateway)

    rules.write_text(BAD_RULES)
    gateway.request_reload()
    await wait_until(lambda: gateway.rule_reload is not None)
    async with TestClient(TestServer(create_app(gateway))) as client:
        url = str(client.make_url("")).rstrip("/")
        reload = (await fetch(client, "/api/rules"))["reload"]
        assert reload["accepted"] is False
        assert reload["message"] == "reload refused (1 error): the previous rules keep running"
        [diagnostic] = reload["diagnostics"]
        assert diagnostic["position"] == f"{rules}:6:11" and "unknown point 'zone3.co3'" in diagnostic["message"]
        alarms = (await fetch(client, "/api/status"))["alarms"]
        assert {k: alarms[0][k] for k in ("severity", "source")} == {"severity": "warning", "source": "rules"}
        page = await text(client, "/")
        assert f"{rules}:6:11" in page and "reload refused (1 error)" in page
        code = await asyncio.to_thread(cmd_status, status_args(url))
        out = capsys.readouterr().out
        assert code == 0
        assert "reload refused (1 error): the previous rules keep running" in out
        assert f"    {rules}:6:11: unknown point 'zone3.co3'" in out

        rules.write_text(GOOD_RULES.replace("* 2", "* 3"))
        gateway.request_reload()
        await wait_until(lambda: gateway.rule_reload is not None and gateway.rule_reload.accepted)
        view = await fetch(client, "/api/rules")
        assert view["reload"]["accepted"] is True and view["reload"]["diagnostics"] == []
        assert "reload refused" not in await text(client, "/")
        await asyncio.to_thread(cmd_status, status_args(url))
        out = capsys.readouterr().out
        assert "reload refused" not in out and "zone3.co3" not in out
        assert not [a for a in (await fetch(client, "/api/alarms")) if a["source"] == "rules"]


def status_args(url: str) -> argparse.Namespace:
    return argparse.Namespace(url=url, token_file=None, timeout=5.0, problems=True)


async def text(client: TestClient[Any, Any], path: str) -> str:
    resp = await client.get(path)
    assert resp.status == 200
    return await resp.text()


async def fetch(client: TestClient[Any, Any], path: str) -> Any:
    return orjson.loads(await text(client, path))
