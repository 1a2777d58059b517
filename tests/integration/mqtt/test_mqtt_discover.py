"""``edge-gateway mqtt discover`` against a real Mosquitto carrying sample traffic of each family it recognises;
its output is a site file that ``edge-gateway check`` accepts and that maps the published devices."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import orjson
import pytest

from drivers.mqtt.source import build_sources
from gateway.cli import main
from gateway.config.site import load_site
from tests.integration.mqtt.test_mqtt_broker import Collector, publish, running, wait_until
from tests.services import Mosquitto

pytestmark = pytest.mark.integration

BRIDGE_DEVICES = orjson.dumps(
    [
        {"friendly_name": "Coordinator", "type": "Coordinator"},
        {
            "friendly_name": "floor1/kitchen/motion",
            "type": "EndDevice",
            "definition": {
                "model": "RTCGQ11LM",
                "exposes": [
                    {"type": "binary", "property": "occupancy", "access": 1, "value_on": True, "value_off": False},
                    {"type": "numeric", "property": "illuminance", "access": 1, "unit": "lx"},
                    {"type": "numeric", "property": "battery", "access": 1, "unit": "%"},
                    {"type": "numeric", "property": "linkquality", "access": 1, "unit": "lqi"},
                ],
            },
        },
        {
            "friendly_name": "Hall Lamp",
            "type": "Router",
            "definition": {
                "exposes": [
                    {"type": "light", "features": [{"type": "binary", "property": "state", "access": 7}]},
                    {"type": "enum", "property": "power_on_behavior", "access": 7, "values": ["off", "on"]},
                    {"type": "numeric", "property": "identify", "access": 2},  # write-only: not a point
                ]
            },
        },
    ]
)
TRAFFIC = [
    ("zigbee2mqtt/bridge/devices", BRIDGE_DEVICES),
    ("zigbee2mqtt/floor1/kitchen/motion/availability", b'{"state":"online"}'),
    (
        "tele/th01/SENSOR",
        b'{"Time":"2024-01-05T10:00:00","AM2301":{"Temperature":70.9,"Humidity":57.2},"TempUnit":"F"}',
    ),
    ("tele/plug1/SENSOR", b'{"Time":"2024-01-05T10:00:00","ENERGY":{"Total":12.5,"Power":40,"Voltage":230}}'),
    ("tele/plug1/STATE", b'{"Time":"2024-01-05T10:00:00","Uptime":"0T01:00:00","POWER":"ON","Wifi":{"RSSI":70}}'),
    ("tele/plug1/LWT", b"Online"),
    (
        "shellyplus1pm-441793d69718/events/rpc",
        b'{"src":"shellyplus1pm-441793d69718","method":"NotifyStatus","params":{"ts":1.7e9,'
        b'"switch:0":{"id":0,"output":true,"apower":8.9,"aenergy":{"total":1.231,"by_minute":[0,0,0]}}}}',
    ),
    ("shellyplus1pm-441793d69718/online", b"true"),
    ("lora/70b3d57ed0041a2b/up", b'[{"bn":"urn:dev:eui:70b3d57ed0041a2b:","n":"energy","u":"Wh","v":1523417}]'),
    (
        "v3/app1@ttn/devices/eui-0004a30b001c0530/up",
        b'{"end_device_ids":{"device_id":"eui-0004a30b001c0530"},"received_at":"2026-01-05T10:00:00Z",'
        b'"uplink_message":{"decoded_payload":{"temperature":25.5,"door_open":false},"rx_metadata":[{"rssi":-61}]}}',
    ),
    ("some/other/thing", b"hello"),
]


def _discover(port: int, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["mqtt", "discover", "--broker", f"127.0.0.1:{port}", "--seconds", "1"])
    return code, capsys.readouterr().out


async def test_discover_prints_a_site_that_check_accepts_and_that_maps_the_devices(
    broker: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # retained, as bridge/devices, availability and (here) the readings are on a broker that has been running
    await publish(broker.port, TRAFFIC, qos=1, retain=True)
    try:
        code, out = await asyncio.to_thread(_discover, broker.port, capsys)
    finally:
        await publish(broker.port, [(topic, b"") for topic, _ in TRAFFIC], qos=1, retain=True)
    assert code == 0
    site_file = tmp_path / "discovered.yaml"
    site_file.write_text(out, encoding="utf-8")
    assert main(["check", str(site_file)]) == 0, capsys.readouterr()

    config = load_site(site_file).config
    devices = {d.id: d for d in config.devices}
    assert set(devices) == {
        "floor1_kitchen_motion",
        "hall_lamp",
        "th01",
        "plug1",
        "shellyplus1pm_441793d69718",
        "dev_70b3d57ed0041a2b",
        "eui_0004a30b001c0530",
    }
    motion = devices["floor1_kitchen_motion"].points  # type: ignore[attr-defined]
    assert (motion["occupancy"].kind, motion["illuminance"].unit) == ("bool", "lx")
    assert "identify" not in devices["hall_lamp"].points  # type: ignore[attr-defined]
    lamp = devices["hall_lamp"].points  # type: ignore[attr-defined]
    assert (lamp["state"].kind, lamp["power_on_behavior"].kind) == ("bool", "str")  # a light's feature; an enum
    th = devices["th01"].points  # type: ignore[attr-defined]
    assert th["am2301_temperature"].unit == "°F"
    plug = devices["plug1"].points  # type: ignore[attr-defined]
    assert (plug["energy_total"].unit, plug["energy_total"].subscription) == ("kWh", "tasmota")
    assert (plug["power"].kind, plug["power"].subscription) == ("bool", "tasmota_state")
    shelly = devices["shellyplus1pm_441793d69718"].points  # type: ignore[attr-defined]
    assert (shelly["switch_0_apower"].unit, shelly["switch_0_aenergy_total"].unit) == ("W", "Wh")
    assert shelly["switch_0_output"].kind == "bool"
    assert devices["dev_70b3d57ed0041a2b"].points["energy"].unit == "Wh"  # type: ignore[attr-defined]
    tts = devices["eui_0004a30b001c0530"].points  # type: ignore[attr-defined]
    assert (tts["door_open"].kind, tts["rssi"].path) == ("bool", "$.@rssi")
    [source] = config.mqtt_sources
    assert {a.format for a in source.availability} == {"zigbee2mqtt", "tasmota", "shelly"}
    assert "# not recognised: 1 topic(s) under some/..." in out


async def test_the_discovered_site_reads_the_devices_live(
    broker: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The snippet is not only valid: a source built from it decodes the traffic it was discovered from."""
    stop = threading.Event()
    await publish(broker.port, TRAFFIC[:1], qos=1, retain=True)
    try:
        code, out = await asyncio.to_thread(_discover_while_publishing, broker.port, capsys, stop)
    finally:
        await publish(broker.port, [(TRAFFIC[0][0], b"")], qos=1, retain=True)
    assert code == 0
    site_file = tmp_path / "discovered.yaml"
    site_file.write_text(out, encoding="utf-8")
    [source] = build_sources(load_site(site_file))
    sink = Collector()
    async with running(source, sink):
        await wait_until(lambda: source.connected, what="connect")
        await publish(broker.port, TRAFFIC[2:5] + TRAFFIC[6:7] + TRAFFIC[8:10], qos=1)
        await wait_until(lambda: len(sink.samples) >= 12, what="samples of every device")
    assert sink.values("th01.am2301_temperature") == [70.9]  # °F configured: kept in °F
    assert sink.values("plug1.power") == [True]
    assert sink.values("dev_70b3d57ed0041a2b.energy") == [1523417.0]
    assert sink.values("eui_0004a30b001c0530.rssi") == [-61.0]
    assert sum(s.malformed for s in source.ingest.stats.values()) == 0


def _discover_while_publishing(port: int, capsys: pytest.CaptureFixture[str], stop: threading.Event) -> tuple[int, str]:
    # live (not retained) traffic while discover listens: published until discover returns, so no timing is assumed
    def keep_publishing() -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="discover-traffic")
        client.connect("127.0.0.1", port)
        client.loop_start()
        while not stop.is_set():
            for topic, payload in TRAFFIC[1:]:
                client.publish(topic, payload, qos=0)
            stop.wait(0.1)
        client.disconnect()
        client.loop_stop()

    publisher = threading.Thread(target=keep_publishing)
    publisher.start()
    try:
        return _discover(port, capsys)
    finally:
        stop.set()
        publisher.join()
