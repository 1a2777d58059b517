"""The status server against DNS rebinding and framing: the Host allowlist, the security headers on every answer,
and ``/metrics`` behind the token on a public bind."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.config.types import Secret
from gateway.errors import ConfigError
from gateway.http.server import HostAllowlist, create_app, local_address, serve, split_host
from gateway.supervisor import Gateway
from tests.unit.http.test_http_serve import make_gateway

TOKEN = "0123456789abcdef-token"


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(gateway, allowed_hosts=["gateway.example.org", "proxy.example.org:8443"])
    async with TestClient(TestServer(app, host="127.0.0.1")) as test_client:
        yield test_client


def port_of(client: TestClient[Any, Any]) -> int:
    port = client.server.port
    assert port is not None
    return port


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost:8080", ("localhost", 8080)),
        ("LocalHost", ("localhost", None)),
        ("[::1]:8080", ("[::1]", 8080)),
        ("[::1]", ("[::1]", None)),
        ("evil.example:x", ("evil.example", -1)),
    ],
)
def test_split_host(host: str, expected: tuple[str, int | None]) -> None:
    assert split_host(host) == expected


def test_allowlist_rules() -> None:
    allowed = HostAllowlist(["gw.example.org", "proxy.example.org:8443"])
    local = ("127.0.0.1", 8080)
    for host in ("localhost:8080", "127.0.0.1:8080", "[::1]:8080", "gw.example.org", "GW.example.org:9999"):
        assert allowed.allows(host, local), host
    assert allowed.allows("proxy.example.org:8443", local)
    for host in ("localhost:9090", "localhost", "evil.example:8080", "proxy.example.org", "127.0.0.2:8080", ""):
        assert not allowed.allows(host, local), host
    # the address a request arrived at is allowed (an address in Host cannot come from DNS rebinding)
    assert allowed.allows("192.168.1.20:8080", ("192.168.1.20", 8080))
    assert allowed.allows("[fd00::5]:8080", ("fd00::5", 8080))
    # on port 80 a browser sends no port
    assert allowed.allows("localhost", ("127.0.0.1", 80))


async def test_a_foreign_host_is_refused_with_one_line(client: TestClient[Any, Any]) -> None:
    for path in ("/", "/api/status", "/metrics", "/static/status.js"):
        resp = await client.get(path, headers={"Host": f"rebind.attacker.example:{port_of(client)}"})
        assert resp.status == 421, path
        body = await resp.text()
        assert body.count("\n") == 1 and "http.allowed_hosts" in body
        assert resp.headers["X-Frame-Options"] == "DENY"
    # a loopback name on another port is not this server either
    assert (await client.get("/", headers={"Host": f"localhost:{port_of(client) + 1}"})).status == 421


async def test_allowed_hosts_are_served(client: TestClient[Any, Any]) -> None:
    port = port_of(client)
    for host in (
        f"localhost:{port}",
        f"127.0.0.1:{port}",
        f"[::1]:{port}",
        "gateway.example.org",
        "proxy.example.org:8443",
    ):
        resp = await client.get("/api/points", headers={"Host": host})
        assert resp.status == 200, host


@pytest.mark.parametrize(
    ("sockname", "expected"),
    [
        (("192.168.1.20", 8080), ("192.168.1.20", 8080)),
        (("::ffff:192.168.1.20", 8080, 0, 0), ("192.168.1.20", 8080)),  # an IPv4 client of a dual-stack bind
        (("FD00::5", 8080, 0, 0), ("fd00::5", 8080)),
        (None, None),
    ],
)
def test_local_address(sockname: object, expected: tuple[str, int] | None) -> None:
    assert local_address(sockname) == expected


async def test_probes_answer_whatever_the_host(client: TestClient[Any, Any]) -> None:
    for path in ("/healthz", "/readyz"):
        assert (await client.get(path, headers={"Host": "kubelet.probe"})).status == 200


async def test_every_answer_carries_the_security_headers(client: TestClient[Any, Any]) -> None:
    for path, status in (
        ("/", 200),
        ("/static/status.css", 200),
        ("/metrics", 200),
        ("/api/nothing", 404),
        ("/static/nothing.js", 404),
        ("/healthz", 200),
    ):
        resp = await client.get(path)
        assert resp.status == status, path
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert resp.headers["X-Content-Type-Options"] == "nosniff", path
        assert resp.headers["X-Frame-Options"] == "DENY", path
    resp = await client.post("/api/points")  # 405 too
    assert resp.status == 405 and resp.headers["X-Frame-Options"] == "DENY"


async def test_the_token_answers_401_with_the_headers(gateway: Gateway) -> None:
    async with TestClient(TestServer(create_app(gateway, token=Secret(TOKEN)))) as locked:
        resp = await locked.get("/metrics")
        assert resp.status == 401 and resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_allowed_hosts_are_checked_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a host name"):
        make_gateway(tmp_path, "allowed_hosts: ['http://gw.example.org/']\n")
    gateway = make_gateway(tmp_path, "allowed_hosts: [GW.Example.org, 'gw2.example.org:8443']\n")
    assert gateway.site.config.http.allowed_hosts == ["gw.example.org", "gw2.example.org:8443"]


async def test_metrics_need_the_token_on_a_public_bind(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path, "listen: 0.0.0.0:0\ntoken_file: token.txt\nallowed_hosts: [gw.example.org]\n")
    (tmp_path / "token.txt").write_text(TOKEN + "\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stopping = asyncio.Event()
    task = asyncio.ensure_future(serve(gateway, f"0.0.0.0:{port}", stopping))
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.01)
            async with session.get(url) as resp:
                assert resp.status == 401
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with session.get(url, headers=auth) as resp:
                assert resp.status == 200 and "edge_gateway" in await resp.text()
            # the configured name from the site file reaches the server; a foreign one does not, token or not
            async with session.get(url, headers={**auth, "Host": "gw.example.org"}) as resp:
                assert resp.status == 200
            async with session.get(url, headers={**auth, "Host": f"rebind.example:{port}"}) as resp:
                assert resp.status == 421
    finally:
        stopping.set()
        await asyncio.wait_for(task, timeout=3)
