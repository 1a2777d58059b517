"""Starting and stopping the status server: refusals with clear errors, and a prompt return on shutdown."""

from __future__ import annotations

import asyncio
import socket
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.config.site import load_site
from gateway.errors import ConfigError
from gateway.http.access import is_loopback, parse_listen
from gateway.http.server import HttpServerError, serve
from gateway.supervisor import Gateway

TOKEN = "0123456789abcdef-token"


def make_gateway(tmp_path: Path, http: str) -> Gateway:
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\n"
        "gateway: {id: gw1, site: plant}\n"
        "http:\n" + textwrap.indent(textwrap.dedent(http), "  ") + "devices:\n"
        "  - {id: zone1, driver: simulator, profile: sim-zone, poll: 1s}\n"
    )
    return Gateway(load_site(site), data_dir=tmp_path / "data", http_listen="off")


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:9000", ("::1", 9000)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["8080", ":8080", "host:port", "127.0.0.1:70000", "127.0.0.1:"])
def test_parse_listen_rejects(listen: str) -> None:
    with pytest.raises(ValueError, match=r"HOST:PORT|port must be"):
        parse_listen(listen)


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20") and not is_loopback("gateway.local")


async def test_a_public_bind_without_a_token_is_refused_at_the_site_line(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, "listen: 0.0.0.0:8080\n")
    with pytest.raises(ConfigError) as caught:
        serve(gateway, "0.0.0.0:8080", asyncio.Event())
    [diag] = caught.value.diagnostics
    assert diag.file.endswith("site.yaml") and diag.line == 4
    assert "not loopback: set http.token_file" in diag.message
    assert "listen: 0.0.0.0:8080" in str(caught.value)


async def test_a_public_bind_from_the_command_line_names_the_option(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, "enabled: true\n")
    with pytest.raises(ConfigError, match=r"--http 192\.168\.1\.20:8080: .*not loopback"):
        serve(gateway, "192.168.1.20:8080", asyncio.Event())


async def test_a_missing_or_weak_token_file_is_refused(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, "listen: 0.0.0.0:0\ntoken_file: token.txt\n")
    with pytest.raises(ConfigError, match="cannot read secret file"):
        serve(gateway, "0.0.0.0:0", asyncio.Event())
    (tmp_path / "token.txt").write_text("short\n")
    with pytest.raises(ConfigError, match="shorter than 16 characters"):
        serve(gateway, "0.0.0.0:0", asyncio.Event())


async def test_a_malformed_address_is_a_config_error(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, "enabled: true\n")
    with pytest.raises(ConfigError, match="must be HOST:PORT"):
        serve(gateway, "8080", asyncio.Event())


async def test_an_address_in_use_is_refused_before_start(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, "enabled: true\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(HttpServerError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(gateway, f"127.0.0.1:{port}", asyncio.Event())


async def test_serves_with_a_token_and_returns_promptly_when_stopping(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, "listen: 0.0.0.0:0\ntoken_file: token.txt\n")
    (tmp_path / "token.txt").write_text(TOKEN + "\n")
    with socket.socket() as probe:  # a free port, so the test knows where to connect
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stopping = asyncio.Event()
    task = asyncio.ensure_future(serve(gateway, f"0.0.0.0:{port}", stopping))
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    assert resp.status == 200
                break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.01)
        async with session.get(f"http://127.0.0.1:{port}/api/points") as resp:
            assert resp.status == 401
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with session.get(f"http://127.0.0.1:{port}/api/points", headers=headers) as resp:
            assert resp.status == 200
        # the session keeps its connection open: shutdown must not wait for the client to hang up
        started = time.monotonic()
        stopping.set()
        await asyncio.wait_for(task, timeout=3)
        assert time.monotonic() - started < 2
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz"):
            pass
