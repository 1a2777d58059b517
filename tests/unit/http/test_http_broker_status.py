"""Which broker an MQTT connection uses and how often it failed over, in /api/devices (the source's devices),
/api/uplinks (the platform uplink) and /metrics, read from a real MqttSource and a real platform UplinkRunner (not
connected: the figures come from their broker rotation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from drivers.mqtt.config import MqttDeviceConfig, MqttSourceConfig
from drivers.mqtt.source import MqttSource
from gateway.http.server import create_app
from gateway.outbox import Outbox
from gateway.supervisor import Gateway
from gateway.uplinks.runner import build_uplinks
from tests.integration.uplinks.common import CommandRecorder, load


async def test_broker_in_use_and_failovers_in_api_and_metrics(gateway: Gateway, tmp_path: Path) -> None:
    source = MqttSource(
        MqttSourceConfig.model_validate(
            {
                "id": "building",
                "brokers": ["node1:1883", "node2:1884"],
                "subscriptions": [{"id": "z2m", "topic": "zigbee2mqtt/+", "decoder": {"type": "zigbee2mqtt"}}],
            }
        ),
        [
            MqttDeviceConfig.model_validate(
                {"id": "lobby", "driver": "mqtt", "source": "building", "points": {"temperature": {"unit": "degC"}}}
            )
        ],
    )
    assert source.brokers.failed()  # as after a lost session on node1
    site = load(tmp_path, "  platform: {brokers: ['mqtt://p1', 'p2:1990', 'p3'], prefix: st}\n")
    outbox = Outbox(tmp_path / "uplink-outbox.db")
    (runner,) = build_uplinks(site, outbox, commands=CommandRecorder())  # type: ignore[arg-type]
    rotation = runner.uplink.brokers  # type: ignore[attr-defined]
    assert [rotation.failed(), rotation.failed()] == [True, True]  # p1 and p2 failed: now on p3
    gateway.sources = [*gateway.sources, source]
    gateway.uplinks = [*gateway.uplinks, runner]
    try:
        async with TestClient(TestServer(create_app(gateway))) as client:
            devices: list[dict[str, Any]] = orjson.loads(await (await client.get("/api/devices")).read())
            (lobby,) = [d for d in devices if d["id"] == "lobby"]
            assert lobby["driver_info"] == {"broker": "node2:1884", "failovers": 1}
            assert lobby["counters"]["source"] == "mqtt[building]"

            uplinks: list[dict[str, Any]] = orjson.loads(await (await client.get("/api/uplinks")).read())
            (platform,) = [u for u in uplinks if u["name"] == runner.name]
            assert (platform["broker"], platform["failovers"]) == ("p3:1883", 2)

            text = await (await client.get("/metrics")).text()
    finally:
        await outbox.close()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    failovers = {s.labels["connection"]: s.value for s in samples if s.name == "edge_gateway_mqtt_failovers_total"}
    assert failovers == {"mqtt[building]": 1.0, runner.name: 2.0}
    info = {
        (s.labels["connection"], s.labels["broker"]): s.value
        for s in samples
        if s.name == "edge_gateway_mqtt_broker_info"
    }
    assert info == {("mqtt[building]", "node2:1884"): 1.0, (runner.name, "p3:1883"): 1.0}
