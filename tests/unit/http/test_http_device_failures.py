"""Per-device failed-read counts and driver facts in /api/devices and /metrics, and the degraded state on the page
(issue 15, items 1 and 8, Modbus part). Device statuses are set directly; the driver that fills them is tested
against a real Modbus server in tests/integration/modbus/test_modbus_adaptive.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway.driver_api import DeviceState, DeviceStatus
from gateway.http.server import create_app
from gateway.supervisor import Gateway


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(gateway))) as test_client:
        yield test_client


def degraded_meter(gateway: Gateway) -> DeviceStatus:
    status = gateway.sources[0].status()[0]
    status.count_failure("exception_3")
    status.count_failure("exception_2", 4)
    status.info["max_registers"] = 50
    assert status.record_partial(0.004, "unit 1 refused read holding 500+1: exception 2 (illegal data address)")
    assert not status.record_partial(0.004, "unit 1 refused read holding 500+1: exception 2 (illegal data address)")
    return status


async def test_api_devices_shows_failures_by_reason_and_the_learned_limit(
    client: TestClient[Any, Any], gateway: Gateway
) -> None:
    status = degraded_meter(gateway)
    resp = await client.get("/api/devices")
    assert resp.status == 200
    devices = {d["id"]: d for d in orjson.loads(await resp.read())}
    shown = devices[status.device]
    assert shown["state"] == "degraded"
    assert shown["failures"] == {"exception_3": 1, "exception_2": 4}
    assert shown["driver_info"] == {"max_registers": 50}
    assert shown["last_ok_age_s"] is not None, "a degraded device did read OK"
    others = [d for d in devices.values() if d["id"] != status.device]
    assert all(d["failures"] == {} and d["state"] == "online" for d in others)


async def test_metrics_count_failed_reads_by_reason_and_a_degraded_device_is_up(
    client: TestClient[Any, Any], gateway: Gateway
) -> None:
    status = degraded_meter(gateway)
    resp = await client.get("/metrics")
    assert resp.status == 200
    samples = [s for f in text_string_to_metric_families(await resp.text()) for s in f.samples]
    failures = {
        s.labels["reason"]: s.value
        for s in samples
        if s.name == "edge_gateway_device_read_failures_total" and s.labels["device"] == status.device
    }
    assert failures == {"exception_2": 4.0, "exception_3": 1.0}
    up = [s.value for s in samples if s.name == "edge_gateway_device_up" and s.labels["device"] == status.device]
    assert up == [1.0], "degraded: it answered its last poll"


async def test_the_page_and_alarms_show_degraded_as_a_warning(client: TestClient[Any, Any], gateway: Gateway) -> None:
    status = degraded_meter(gateway)
    assert status.state is DeviceState.DEGRADED
    resp = await client.get("/api/status")
    data = orjson.loads(await resp.read())
    alarms = [a for a in data["alarms"] if a["source"] == f"device {status.device}"]
    assert alarms == [
        {
            "severity": "warning",
            "source": f"device {status.device}",
            "message": "degraded: unit 1 refused read holding 500+1: exception 2 (illegal data address)",
        }
    ]
    page = await (await client.get("/")).text()
    assert '<span class="badge warn">degraded</span>' in page


def test_a_good_poll_after_degraded_is_online_again() -> None:
    status = DeviceStatus("meter", "modbus")
    status.record_partial(0.01, "refused")
    status.record_ok(0.01)
    assert status.state is DeviceState.ONLINE and status.last_error is None
    assert status.errors == 0 and status.polls == 2
