"""Devices as they behave in the field, against a real Mosquitto: payload units converted or refused, availability
topics (retained, as Zigbee2MQTT, Tasmota and Shelly publish them) driving device state and BAD samples, Shelly Gen2
status topics, Zigbee2MQTT names with '/', The Things Stack uplinks, and the counters reaching /api/devices,
/metrics and the status page of a real Gateway."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.mqtt.source import MqttSource, build_sources
from gateway.config.site import load_site
from gateway.driver_api import DeviceState
from gateway.http import page, views
from gateway.metrics import build_registry, exposition
from gateway.model import Quality, Sample
from gateway.supervisor import Gateway
from tests.integration.mqtt.test_mqtt_broker import Collector, publish, running, wait_until
from tests.services import Mosquitto

pytestmark = pytest.mark.integration

SITE = """version: 1
gateway: {{id: gw1, site: hq}}
mqtt_sources:
  - id: building
    host: 127.0.0.1
    port: {port}
    reconnect_min: 100ms
    reconnect_max: 500ms
    subscriptions:
      - {{id: z2m, topic: "zigbee2mqtt/#", template: "zigbee2mqtt/{{device}}", qos: 1, decoder: {{type: zigbee2mqtt}}}}
      - {{id: tasmota, topic: "tele/+/SENSOR", qos: 1, decoder: {{type: tasmota}}}}
      - {{id: shelly, topic: "+/status/+", template: "{{device}}/status/{{field}}", decoder: {{type: shelly_gen2}}}}
      - {{id: tts, topic: "v3/+/devices/+/up", template: "v3/+/devices/{{device}}/up", decoder: {{type: tts_v3}}}}
      - {{id: senml, topic: "lora/+/up", qos: 1, decoder: {{type: senml}}}}
    availability:
      - {{topic: "zigbee2mqtt/#", template: "zigbee2mqtt/{{device}}/availability", format: zigbee2mqtt}}
      - {{topic: "tele/+/LWT", format: tasmota}}
      - {{topic: "+/online", format: shelly}}
devices:
  - id: kitchen_motion
    driver: mqtt
    source: building
    subscription: z2m
    topic_name: floor1/kitchen/motion
    points:
      occupancy: {{kind: bool}}
      temperature: {{unit: °C, min: -40, max: 85}}
  - id: th_sensor
    driver: mqtt
    source: building
    subscription: tasmota
    topic_name: sonoff_th
    points:
      temperature: {{path: $.AM2301.Temperature, unit: °C}}
      humidity: {{path: $.AM2301.Humidity, unit: "%"}}
  - id: heater
    driver: mqtt
    source: building
    subscription: shelly
    topic_name: shellyplus1pm-441793d69718
    points:
      power_kw: {{path: "$.switch:0.apower", unit: kW}}
      energy_kwh: {{path: "$.switch:0.aenergy.total", unit: kWh}}
  - id: lora_node
    driver: mqtt
    source: building
    subscription: tts
    topic_name: eui-0004a30b001c0530
    points:
      temperature: {{unit: °C}}
      rssi: {{path: $.@rssi, unit: dBm}}
  - id: meter
    driver: mqtt
    source: building
    subscription: senml
    topic_name: m1
    points:
      energy: {{unit: kWh}}
"""

TTS_UP = (
    b'{"end_device_ids":{"device_id":"eui-0004a30b001c0530"},"received_at":"2026-01-05T10:00:00.123456789Z",'
    b'"uplink_message":{"decoded_payload":{"temperature":25.5},"rx_metadata":[{"rssi":-90},{"rssi":-61}]}}'
)


async def test_units_availability_topics_and_counters_end_to_end(broker: Mosquitto, tmp_path: Path) -> None:
    site_file = tmp_path / "site.yaml"
    site_file.write_text(SITE.format(port=broker.port), encoding="utf-8")
    site = load_site(site_file)
    [source] = build_sources(site)
    sink = Collector()
    # availability is retained in the field: the state is known the moment the gateway subscribes
    await publish(
        broker.port,
        [("zigbee2mqtt/floor1/kitchen/motion/availability", b'{"state":"online"}'), ("tele/sonoff_th/LWT", b"Online")],
        qos=1,
        retain=True,
    )
    try:
        async with running(source, sink):
            await wait_until(lambda: source.connected, what="connect")
            await wait_until(
                lambda: source.ingest.counters["th_sensor"].available is True, what="retained availability"
            )
            await publish(
                broker.port,
                [
                    (
                        "zigbee2mqtt/floor1/kitchen/motion",
                        b'{"occupancy": true, "temperature": 21.5, "linkquality": 80}',
                    ),
                    ("zigbee2mqtt/floor1/kitchen/motion", b'{"occupancy": false, "temperature": 300}'),  # range
                    ("zigbee2mqtt/floor1/kitchen/motion", b"{not json"),
                    ("tele/sonoff_th/SENSOR", b'{"AM2301":{"Temperature":70.9,"Humidity":57.2},"TempUnit":"F"}'),
                    ("tele/sonoff_th/SENSOR", b'{"AM2301":{"Temperature":21.0,"Humidity":50},"TempUnit":"R"}'),
                    (
                        "shellyplus1pm-441793d69718/status/switch:0",
                        b'{"id":0,"output":true,"apower":1500.0,"aenergy":{"total":2500.0}}',
                    ),
                    ("v3/app1@ttn/devices/eui-0004a30b001c0530/up", TTS_UP),
                    ("lora/m1/up", b'[{"n":"energy","u":"Wh","v":1523417}]'),
                    ("lora/m1/up", b'[{"n":"energy","u":"A","v":3}]'),  # no conversion: refused
                    ("zigbee2mqtt/Unknown Lamp", b'{"state": "ON"}'),
                    ("tele/sonoff_th/LWT", b"Offline"),
                    ("shellyplus1pm-441793d69718/online", b"false"),
                ],
                qos=1,
            )
            await wait_until(lambda: source.ingest.counters["heater"].available is False, what="shelly offline")
            await wait_until(lambda: len(sink.values("heater.power_kw")) == 2, what="heater BAD samples")
            gw = Gateway(site, data_dir=tmp_path / "data", http_listen="off", sources=[source])
            gw.sources = [source]
            api = {d["id"]: d for d in views.devices(gw)}
            overview = views.overview(gw)
            metrics = exposition(build_registry(gw)).decode()
            html = page.render(overview)
            statuses = {s.device: s for s in source.status()}
    finally:
        await publish(
            broker.port,
            [("zigbee2mqtt/floor1/kitchen/motion/availability", b""), ("tele/sonoff_th/LWT", b"")],
            qos=1,
            retain=True,
        )

    # units: converted to the configured unit, or refused; never a GOOD sample in another unit
    assert sink.values("th_sensor.temperature") == [pytest.approx(21.611111, abs=1e-6), None]
    assert sink.values("th_sensor.humidity") == [57.2, 50.0, None]
    assert sink.values("heater.power_kw") == [1.5, None]
    assert sink.values("heater.energy_kwh") == [2.5, None]
    assert sink.values("meter.energy") == [pytest.approx(1523.417)]
    assert sink.values("lora_node.temperature") == [25.5]
    assert sink.values("lora_node.rssi") == [-61.0]
    assert sink.values("kitchen_motion.occupancy") == [True, False]
    assert sink.values("kitchen_motion.temperature") == [21.5]  # 300 °C is outside [-40, 85]
    # offline: one BAD sample per point, at the availability message
    bad = [s for s in sink.samples if s.quality is Quality.BAD]
    assert {s.point for s in bad} == {
        "th_sensor.temperature",
        "th_sensor.humidity",
        "heater.power_kw",
        "heater.energy_kwh",
    }
    assert all(s.value is None for s in bad)
    assert all(s.quality is Quality.GOOD for s in sink.samples if s.value is not None)

    assert statuses["th_sensor"].state is DeviceState.OFFLINE
    assert statuses["th_sensor"].last_error == "offline (availability: tele/sonoff_th/LWT)"
    assert statuses["heater"].state is DeviceState.OFFLINE
    assert statuses["kitchen_motion"].state is DeviceState.ONLINE
    assert (statuses["kitchen_motion"].polls, statuses["kitchen_motion"].errors) == (3, 1)  # bad JSON is no poll
    assert (statuses["meter"].polls, statuses["meter"].errors) == (2, 1)  # the refused-only message is no poll

    # availability is never malformed; the unknown lamp is unmapped
    assert source.ingest.stats["z2m"].malformed_by_reason == {"json": 1}
    assert source.ingest.stats["tasmota"].malformed == 0
    assert source.ingest.stats["z2m"].unmapped == 1

    # the same counters in /api/devices, /metrics and on the status page
    kitchen = api["kitchen_motion"]["counters"]
    assert kitchen["source"] == "mqtt[building]"
    assert kitchen["malformed_by_reason"] == {"json": 1}
    assert kitchen["refused_by_reason"] == {"range": 1}
    assert kitchen["undeclared"] == 1  # linkquality, counted once
    assert api["th_sensor"]["counters"]["refused_by_reason"] == {"unit": 1}
    assert api["th_sensor"]["counters"]["unavailable"] == 1
    assert api["meter"]["counters"]["refused_by_reason"] == {"unit": 1}
    assert api["th_sensor"]["state"] == "offline"
    totals = views.source_message_counters(gw)["mqtt[building]"]
    assert totals["refused_by_reason"] == {"range": 1, "unit": 2}
    assert totals["unavailable"] == 2
    assert totals["unmapped"] == 1
    assert (
        'edge_gateway_device_refused_values_total{device="th_sensor",reason="unit",source="mqtt[building]"} 1.0'
        in metrics
    )
    malformed = 'edge_gateway_device_malformed_messages_total{device="kitchen_motion",reason="json",'
    assert malformed + 'source="mqtt[building]"} 1.0' in metrics
    assert 'edge_gateway_device_unavailable_total{device="heater",source="mqtt[building]"} 1.0' in metrics
    assert 'edge_gateway_source_unmapped_messages_total{source="mqtt[building]"} 1.0' in metrics
    assert 'data-section="messages"' in html
    assert "range 1" in html and "unit 1" in html
    assert "<b>mqtt[building]</b>" in html and "unit 2" in html  # the source's total over its devices


async def test_undeclared_boolean_never_drops_the_declared_values(broker: Mosquitto, tmp_path: Path) -> None:
    site_file = tmp_path / "site.yaml"
    site_file.write_text(SITE.format(port=broker.port), encoding="utf-8")
    [source] = build_sources(load_site(site_file))
    assert isinstance(source, MqttSource)
    sink = Collector()
    async with running(source, sink):
        await wait_until(lambda: source.connected, what="connect")
        await publish(
            broker.port,
            [("lora/m1/up", b'[{"n":"energy","u":"kWh","v":7},{"n":"door","vb":true,"bv":true}]')] * 3,
            qos=1,
        )
        await wait_until(lambda: len(sink.samples) == 3, what="three samples")
    assert sink.samples == [Sample("meter.energy", 7.0, s.ts) for s in sink.samples]
    assert source.ingest.counters["meter"].undeclared == 1
    assert source.ingest.stats["senml"].malformed == 0
