"""The message counters of message-driven sources (MQTT) in /api/devices, /metrics and the status page, read from
any source that offers ``device_counters()``; a source whose counters fail does not break the views."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.driver_api import DeviceStatus
from gateway.http.server import create_app
from gateway.supervisor import Gateway
from tests.unit.http.conftest import StatusSource, online

COUNTERS = {
    "messages": 7,
    "rejected": 3,
    "malformed": 1,
    "malformed_by_reason": {"json": 1},
    "refused": 2,
    "refused_by_reason": {"unit": 2},
    "unavailable": 1,
    "undeclared": 4,
}


class CountingSource(StatusSource):
    name = "mqtt[building]"

    def __init__(self, statuses: list[DeviceStatus], *, broken: bool = False) -> None:
        super().__init__(statuses)
        self.broken = broken

    def device_counters(self) -> dict[str, dict[str, Any]]:
        if self.broken:
            raise RuntimeError("counters unavailable")
        return {s.device: dict(COUNTERS) for s in self.statuses}

    def source_counters(self) -> dict[str, Any]:
        return {**COUNTERS, "unmapped": 5}


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[TestClient[Any, Any]]:
    device = next(iter(gateway.registry.devices()))
    gateway.sources = [*gateway.sources, CountingSource([online(device)])]
    async with TestClient(TestServer(create_app(gateway))) as test_client:
        yield test_client


async def test_counters_in_api_metrics_and_page(client: TestClient[Any, Any], gateway: Gateway) -> None:
    device = next(iter(gateway.registry.devices()))
    devices = orjson.loads(await (await client.get("/api/devices")).read())
    rows = [d for d in devices if d["id"] == device and d["counters"]]
    assert rows and rows[0]["counters"] == {"source": "mqtt[building]", **COUNTERS}
    assert all(d["counters"] is None for d in devices if d["id"] != device)

    metrics = await (await client.get("/metrics")).text()
    key = f'device="{device}",reason="unit",source="mqtt[building]"'
    assert f"edge_gateway_device_refused_values_total{{{key}}} 2.0" in metrics
    assert 'edge_gateway_source_unmapped_messages_total{source="mqtt[building]"} 5.0' in metrics
    assert f'edge_gateway_device_undeclared_fields{{device="{device}",source="mqtt[building]"}} 4.0' in metrics

    page = await (await client.get("/")).text()
    assert 'data-section="messages"' in page
    assert "unit 2" in page and "json 1" in page


async def test_failing_counters_leave_the_views_working(gateway: Gateway) -> None:
    device = next(iter(gateway.registry.devices()))
    gateway.sources = [*gateway.sources, CountingSource([online(device)], broken=True)]
    async with TestClient(TestServer(create_app(gateway))) as client:
        devices = orjson.loads(await (await client.get("/api/devices")).read())
        assert all(d["counters"] is None for d in devices)
        assert (await client.get("/metrics")).status == 200
        page = await (await client.get("/")).text()
        assert 'data-section="messages"' not in page
