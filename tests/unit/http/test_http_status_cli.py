"""``edge-gateway status`` against a served gateway: the picture, the exit codes, the token and the failures."""

from __future__ import annotations

import argparse
import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config.types import Secret
from gateway.http.cli import cmd_status
from gateway.http.server import create_app
from gateway.supervisor import Gateway
from tests.services import free_port

TOKEN = "status-cli-token-0123456789"


def args(url: str, **extra: Any) -> argparse.Namespace:
    return argparse.Namespace(
        url=url, token_file=extra.get("token_file"), timeout=extra.get("timeout", 5.0), problems=extra.get("problems")
    )


@pytest.fixture
async def served(gateway: Gateway) -> AsyncIterator[str]:
    async with TestServer(create_app(gateway)) as server:
        yield str(server.make_url("")).rstrip("/")


async def run_status(capsys: pytest.CaptureFixture[str], namespace: argparse.Namespace) -> tuple[int, str, str]:
    # the command is synchronous (urllib): run it beside the loop that serves the gateway
    code = await asyncio.to_thread(cmd_status, namespace)
    out, err = capsys.readouterr()
    return code, out, err


async def test_prints_every_section_and_exits_0_when_ready(served: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run_status(capsys, args(served))
    assert code == 0, err
    assert out.startswith("Demo Tower, simulated  (demo_tower/demo_gw, v0.1.0)  READY")
    # 36 device points and the building aggregate (privacy.building_aggregate)
    for heading in ("Alarms (0)", "Devices (8)", "Points (37)", "Rules (0)", "Uplinks (0)"):
        assert heading in out
    assert "zone1.co2" in out and "640.0" in out and "ppm" in out
    assert "apt101.power_kw" in out and " bad " in out
    assert "outbox: 0 samples, 0 events" in out


async def test_problems_only_and_exit_1_when_not_ready(
    served: str, gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    for status in gateway.sources[0].status():
        status.record_error("no route to host")
    code, out, _ = await run_status(capsys, args(served, problems=True))
    assert code == 1
    assert "NOT READY" in out and "! drivers: 0 of 8 devices online" in out
    assert re.search(r"ERROR +device zone1 +offline: no route to host", out)
    assert "apt101.power_kw" in out and "zone1.co2" not in out  # only the points that are not good


async def test_token_from_a_file(gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with TestServer(create_app(gateway, token=Secret(TOKEN))) as server:
        url = str(server.make_url("")).rstrip("/")
        code, _, err = await run_status(capsys, args(url))
        assert code == 3 and "HTTP 401" in err and "--token-file" in err
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        code, out, _ = await run_status(capsys, args(url, token_file=str(token_file)))
        assert code == 0 and "READY" in out
        code, _, err = await run_status(capsys, args(url, token_file=str(tmp_path / "missing")))
        assert code == 1 and "cannot read token file" in err


async def test_unreachable_is_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run_status(capsys, args(f"http://127.0.0.1:{free_port()}", timeout=2))
    assert code == 3 and out == ""
    assert "cannot read the gateway's status" in err and "is it running?" in err


async def test_something_else_answering_is_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    async def not_a_gateway(_request: web.Request) -> web.Response:
        return web.json_response({"hello": "world"})

    app = web.Application()
    app.router.add_get("/api/status", not_a_gateway)
    async with TestServer(app) as server:
        code, _, err = await run_status(capsys, args(str(server.make_url("")).rstrip("/")))
    assert code == 3 and "not an edge-gateway status document" in err


async def test_tail_with_the_token_and_without(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.commands import cmd_tail

    monkeypatch.delenv("EDGE_GATEWAY_TOKEN", raising=False)

    async with TestServer(create_app(gateway, token=Secret(TOKEN))) as server:
        url = str(server.make_url("")).rstrip("/")
        tail = argparse.Namespace(points=["zone1.co2"], demo=False, url=url, data_dir=None, duration=0.5)
        code = await asyncio.to_thread(cmd_tail, argparse.Namespace(**vars(tail), token_file=None))
        err = capsys.readouterr().err
        assert code == 3 and "HTTP 401" in err and "--token-file" in err and len(err.splitlines()) == 1
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        code = await asyncio.to_thread(cmd_tail, argparse.Namespace(**vars(tail), token_file=str(token_file)))
        out, err = capsys.readouterr()
        assert (code, err) == (0, "")
        assert re.search(r"zone1\.co2 +640 ppm$", out, re.MULTILINE), out
