"""InfluxUplink and the runner against a local HTTP server playing InfluxDB's refusals: a 400 for one point is
isolated and quarantined while the rest arrives; 401 and 503 keep the data and retry."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.config.site import load_site
from gateway.model import Quality, Sample
from gateway.outbox import Outbox
from gateway.uplinks.runner import build_uplinks
from tests.services import free_port
from tests.unit.uplinks.helpers import until

TS = 1_790_000_000_000_000_000


class FakeInflux:
    """Accepts writes unless they contain the string value "poison" (HTTP 400), or ``status`` says otherwise."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.requests = 0
        self.status = 204
        self.auth: set[str] = set()

    async def write(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.auth.add(request.headers.get("Authorization", ""))
        body = await request.read()  # aiohttp has already undone the client's gzip
        if self.status != 204:
            return web.json_response({"code": "unavailable", "message": "try later"}, status=self.status)
        text = body.decode()
        if '"poison"' in text:
            return web.json_response({"code": "invalid", "message": "field type conflict"}, status=400)
        assert request.query["bucket"] == "b" and request.query["org"] == "acme"
        self.lines.extend(text.splitlines())
        return web.Response(status=204)


async def serve(fake: FakeInflux) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_post("/api/v2/write", fake.write)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def site(tmp_path: Path, port: int) -> Any:
    (tmp_path / "token").write_text("t0ken\n")
    path = tmp_path / "site.yaml"
    path.write_text(
        "version: 1\ngateway: {id: gw1, site: tower}\n"
        "devices:\n  - {id: m1, driver: simulator, profile: sim-energy-meter}\n"
        f"uplinks:\n  influx: {{url: 'http://127.0.0.1:{port}', org: acme, bucket: b, token_file: token,"
        " delivery: {batch_size: 1000, retry_min: 0.01s, retry_max: 0.05s, live_window: 1h}}\n"
    )
    return load_site(path)


async def test_a_refused_point_is_quarantined_and_the_rest_of_the_batch_arrives(tmp_path: Path) -> None:
    fake = FakeInflux()
    server, port = await serve(fake)
    outbox = Outbox(tmp_path / "o.db")
    samples = [Sample("m1.power_kw", float(i), TS + i, Quality.GOOD) for i in range(64)]
    samples[37] = Sample("m1.power_kw", "poison", TS + 37, Quality.GOOD)  # a string into a float field
    await outbox.append(samples)
    (runner,) = build_uplinks(site(tmp_path, port), outbox, commands=lambda c: asyncio.sleep(0))
    stopping = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(runner.run(stopping))
        await asyncio.wait_for(until(lambda: runner.status()["backlog_samples"] == 0, steps=10**8), 10)
        stopping.set()
    await server.cleanup()
    await outbox.close()
    written = sorted(int(line.rsplit(" ", 1)[1]) - TS for line in fake.lines)
    assert written == [i for i in range(64) if i != 37]
    assert runner.status()["quarantined"] == 1
    assert fake.requests <= 2 * 7 + 1  # halving: about two requests per level, not one per point
    assert fake.auth == {"Token t0ken"}


async def test_unauthorised_and_unavailable_keep_the_data_and_retry(tmp_path: Path) -> None:
    fake = FakeInflux()
    server, port = await serve(fake)
    outbox = Outbox(tmp_path / "o.db")
    await outbox.append([Sample("m1.power_kw", 1.0, TS, Quality.GOOD)])
    (runner,) = build_uplinks(site(tmp_path, port), outbox, commands=lambda c: asyncio.sleep(0))
    stopping = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(runner.run(stopping))
        for status in (401, 503):
            fake.status = status
            seen = fake.requests
            await asyncio.wait_for(until(lambda seen=seen: fake.requests >= seen + 2, steps=10**8), 10)
            assert runner.status()["backlog_samples"] == 1
            assert f"HTTP {status}" in (runner.status()["last_error"] or "")
        fake.status = 204
        await asyncio.wait_for(until(lambda: runner.status()["backlog_samples"] == 0, steps=10**8), 10)
        stopping.set()
    await server.cleanup()
    await outbox.close()
    assert len(fake.lines) == 1
    assert runner.status()["quarantined"] == 0
