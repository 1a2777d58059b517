"""The MQTT source against a real Mosquitto: mapping and decoding end to end, broker killed and restarted
mid-stream (resubscribe; persistent-session QoS 1 messages sent while the driver was away arrive), malformed
payloads mixed into a valid stream, a stuck broker detected by keepalive, and writes to command topics."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from drivers.mqtt.config import MqttDeviceConfig, MqttSourceConfig
from drivers.mqtt.source import MqttSource, build_sources
from gateway.config.site import load_site
from gateway.errors import WriteRejected
from gateway.model import Command, Sample
from tests.services import Mosquitto

pytestmark = pytest.mark.integration


def source_config(port: int, **overrides: Any) -> MqttSourceConfig:
    data: dict[str, Any] = {
        "id": "building",
        "host": "127.0.0.1",
        "port": port,
        "keepalive": 5,
        "reconnect_min": "100ms",
        "reconnect_max": "500ms",
        "subscriptions": [
            {"id": "z2m", "topic": "zigbee2mqtt/+", "qos": 1, "decoder": {"type": "zigbee2mqtt"}},
            {"id": "tasmota", "topic": "tele/+/SENSOR", "decoder": {"type": "tasmota"}},
        ],
    }
    data.update(overrides)
    return MqttSourceConfig.model_validate(data)


def device(ident: str, **extra: Any) -> MqttDeviceConfig:
    data: dict[str, Any] = {"id": ident, "driver": "mqtt", "source": "building"}
    data.update(extra)
    return MqttDeviceConfig.model_validate(data)


LIVING = device(
    "living_room",
    topic_name="Living Room",
    subscription="z2m",
    points={"temperature": {"unit": "°C"}, "humidity": {"unit": "%"}, "contact": {"kind": "bool"}},
)
PLUG = device(
    "plug1",
    topic_name="tasmota_1A2B3C",
    subscription="tasmota",
    points={
        "energy_kwh": {"path": "$.ENERGY.Total", "unit": "kWh"},
        "power_kw": {"path": "$.ENERGY.Power", "unit": "kW", "scale": 0.001},
    },
)


class Collector:
    """The publish sink: records every batch, as the bus would receive it."""

    def __init__(self) -> None:
        self.batches: list[list[Sample]] = []

    async def __call__(self, batch: list[Sample]) -> None:
        self.batches.append(batch)

    @property
    def samples(self) -> list[Sample]:
        return [s for batch in self.batches for s in batch]

    def values(self, point: str) -> list[Any]:
        return [s.value for s in self.samples if s.point == point]


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait for real I/O (a broker, a socket) to produce an outcome; fails with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running(source: MqttSource, sink: Collector) -> AsyncIterator[asyncio.Task[None]]:
    stopping = asyncio.Event()
    task = asyncio.create_task(source.run(sink, stopping), name="source-under-test")
    try:
        yield task
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)


def _publish_blocking(port: int, messages: Sequence[tuple[str, bytes]], qos: int, retain: bool = False) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-pub-{os.getpid()}-{time.monotonic_ns()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=qos, retain=retain) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


async def publish(port: int, messages: Sequence[tuple[str, bytes]], qos: int = 1, *, retain: bool = False) -> None:
    """An independent publisher (plain paho on its own thread), not the code under test."""
    await asyncio.to_thread(_publish_blocking, port, messages, qos, retain)


def z2m(temp: float, hum: int = 40) -> bytes:
    return orjson.dumps({"temperature": temp, "humidity": hum, "contact": True, "linkquality": 90})


async def test_maps_topics_to_devices_and_decodes_end_to_end(broker: Mosquitto) -> None:
    source = MqttSource(source_config(broker.port), [LIVING, PLUG])
    sink = Collector()
    async with running(source, sink):
        await wait_until(lambda: source.connected, what="connect")
        await publish(
            broker.port,
            [
                ("zigbee2mqtt/Living Room", z2m(21.5, 48)),
                ("zigbee2mqtt/Kitchen", z2m(19.0)),  # no such device: counted as unmapped
                (
                    "tele/tasmota_1A2B3C/SENSOR",
                    b'{"Time":"2024-01-05T10:00:00","ENERGY":{"Total":12.5,"Power":1500,"Voltage":230}}',
                ),
            ],
        )
        await wait_until(lambda: len(sink.samples) == 5, what="5 samples")
    assert sink.values("living_room.temperature") == [21.5]
    assert sink.values("living_room.humidity") == [48.0]
    assert sink.values("living_room.contact") == [True]
    assert sink.values("plug1.energy_kwh") == [12.5]
    assert sink.values("plug1.power_kw") == [1.5]
    tasmota_ts = next(s.ts for s in sink.samples if s.point == "plug1.energy_kwh")
    assert tasmota_ts == 1704448800 * 10**9  # the payload's Time, read as UTC (the decoder's default zone)
    assert source.ingest.stats["z2m"].unmapped == 1
    assert source.metrics()["subscriptions"]["z2m"]["messages"] == 2
    statuses = {s.device: s for s in source.status()}
    assert statuses["living_room"].polls == 1


async def test_malformed_payloads_are_counted_and_valid_ones_all_arrive(broker: Mosquitto) -> None:
    config = source_config(broker.port, max_payload=512)
    source = MqttSource(config, [LIVING])
    sink = Collector()
    bad = [
        b"{not json",
        b'{"temperature": "warm"}',  # wrong type
        b"\xff\xfe\x00garbage",  # not UTF-8
        b"[1, 2, 3]",  # not an object
        b'{"temperature": 20, "pad": "' + b"x" * 600 + b'"}',  # oversize
    ]
    messages: list[tuple[str, bytes]] = []
    for i in range(200):
        messages.append(("zigbee2mqtt/Living Room", z2m(float(i))))
        if i % 40 == 0:
            messages.extend(("zigbee2mqtt/Living Room", payload) for payload in bad)
    async with running(source, sink):
        await wait_until(lambda: source.connected, what="connect")
        await publish(broker.port, messages)
        await wait_until(lambda: len(sink.values("living_room.temperature")) == 200, what="all valid messages")
        await wait_until(lambda: source.ingest.stats["z2m"].malformed == 25, what="malformed count")
    assert sink.values("living_room.temperature") == [float(i) for i in range(200)]
    by_reason = source.ingest.stats["z2m"].malformed_by_reason
    assert by_reason == {"json": 5, "type": 5, "encoding": 5, "shape": 5, "oversize": 5}


async def test_broker_killed_mid_stream_driver_reconnects_and_resubscribes(broker: Mosquitto) -> None:
    # clean session: the restarted broker knows nothing of us, so new messages only arrive if we resubscribe
    source = MqttSource(source_config(broker.port), [LIVING])
    sink = Collector()
    async with running(source, sink):
        await wait_until(lambda: source.connected, what="connect")
        await publish(broker.port, [("zigbee2mqtt/Living Room", z2m(float(i))) for i in range(50)])
        await wait_until(lambda: len(sink.samples) == 150, what="first half")
        broker.kill()
        await wait_until(lambda: not source.connected, what="disconnect noticed")
        assert source.session_state in ("disconnected", "connecting")
        broker.start()
        await wait_until(lambda: source.connected, what="reconnect")
        await publish(broker.port, [("zigbee2mqtt/Living Room", z2m(float(i))) for i in range(50, 100)])
        await wait_until(lambda: len(sink.samples) == 300, what="second half")
    assert sink.values("living_room.temperature") == [float(i) for i in range(100)]
    assert source.connects == 2
    assert source.disconnects == 1


async def test_persistent_session_receives_qos1_messages_sent_while_driver_was_down(broker: Mosquitto) -> None:
    config = source_config(
        broker.port, client_id="gw-persistent-test", session="persistent", reconnect_min="3s", reconnect_max="3s"
    )
    source = MqttSource(config, [LIVING])
    sink = Collector()
    async with running(source, sink):
        await wait_until(lambda: source.connected, what="connect")
        await publish(broker.port, [("zigbee2mqtt/Living Room", z2m(float(i))) for i in range(20)])
        await wait_until(lambda: len(sink.values("living_room.temperature")) == 20, what="before the outage")
        await asyncio.sleep(1.5)  # mosquitto autosaves its session store every second (autosave_interval 1)
        broker.kill()
        await wait_until(lambda: not source.connected, what="disconnect noticed")
        broker.start()
        # the driver is in its 3 s backoff: these are queued by the broker for our persistent session
        await publish(broker.port, [("zigbee2mqtt/Living Room", z2m(float(i))) for i in range(20, 60)])
        assert not source.connected
        await wait_until(lambda: len(sink.values("living_room.temperature")) == 60, timeout=15, what="backlog")
    assert sink.values("living_room.temperature") == [float(i) for i in range(60)]


async def test_stuck_broker_is_detected_by_keepalive_and_the_session_restarted(broker: Mosquitto) -> None:
    source = MqttSource(source_config(broker.port, keepalive=1), [LIVING])
    sink = Collector()
    assert broker.proc is not None
    pid = broker.proc.pid
    async with running(source, sink):
        await wait_until(lambda: source.connected, what="connect")
        os.kill(pid, signal.SIGSTOP)  # the TCP connection stays open; nothing answers
        try:
            await wait_until(lambda: not source.connected, timeout=6, what="stuck connection detected")
            assert "keepalive" in (source.last_error or "") or "ping" in (source.last_error or "")
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_until(lambda: source.connected, timeout=10, what="reconnect after the broker resumed")
        await publish(broker.port, [("zigbee2mqtt/Living Room", z2m(30.0))])
        await wait_until(lambda: sink.values("living_room.temperature") == [30.0], what="message after restart")


async def test_write_publishes_to_the_command_topic(broker: Mosquitto) -> None:
    lamp = device(
        "lamp",
        topic_name="Lamp",
        subscription="z2m",
        points={
            "on": {"path": "$.state", "kind": "bool", "command": {"topic": "zigbee2mqtt/Lamp/set", "key": "state"}},
            "brightness": {"kind": "int", "min": 0, "max": 254},
        },
    )
    source = MqttSource(source_config(broker.port), [lamp])
    sink = Collector()
    received: list[bytes] = []
    listener = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-listener")
    listener.on_message = lambda client, userdata, message: received.append(message.payload)
    listener.connect("127.0.0.1", broker.port)
    listener.subscribe("zigbee2mqtt/Lamp/set", qos=1)
    listener.loop_start()
    try:
        async with running(source, sink):
            await wait_until(lambda: source.connected, what="connect")
            await asyncio.sleep(0.2)  # let the listener's SUBACK land before the write
            await source.write(Command("lamp.on", True, "test"))
            await wait_until(lambda: received == [b'{"state":"ON"}'], what="command on the broker")
            with pytest.raises(WriteRejected, match="not writable"):
                await source.write(Command("lamp.brightness", 100, "test"))
            with pytest.raises(WriteRejected, match="boolean"):
                await source.write(Command("lamp.on", 3, "test"))
            with pytest.raises(WriteRejected, match="not a point"):
                await source.write(Command("lamp.color", 1, "test"))
    finally:
        listener.disconnect()
        listener.loop_stop()


async def test_site_file_builds_a_working_source(broker: Mosquitto, tmp_path: Path) -> None:
    site_file = tmp_path / "site.yaml"
    site_file.write_text(
        f"""version: 1
gateway: {{id: gw1, site: hq}}
mqtt_sources:
  - id: building
    host: 127.0.0.1
    port: {broker.port}
    subscriptions:
      - {{id: senml, topic: "lora/+/up", decoder: {{type: senml}}}}
devices:
  - id: meter7
    driver: mqtt
    source: building
    topic_name: "70B3D57ED0041A2B"
    points:
      energy_kwh: {{path: energy, unit: kWh}}
""",
        encoding="utf-8",
    )
    site = load_site(site_file)
    [source] = build_sources(site)
    assert source.name == "mqtt[building]"
    assert source.devices == frozenset({"meter7"})
    sink = Collector()
    async with running(source, sink):
        await wait_until(lambda: source.connected, what="connect")
        pack = b'[{"bn":"urn:dev:eui:70b3d57ed0041a2b:","bt":1.7e9,"n":"energy","u":"kWh","v":1234.5}]'
        await publish(broker.port, [("lora/70B3D57ED0041A2B/up", pack)], qos=0)
        await wait_until(lambda: len(sink.samples) == 1, what="senml sample")
    assert sink.samples[0] == Sample("meter7.energy_kwh", 1234.5, 1_700_000_000 * 10**9)


class RefusingCollector(Collector):
    """A sink whose store gives the batches up (what the gateway's sink says when the disk refused them at a stop)."""

    async def __call__(self, batch: list[Sample]) -> bool:
        self.batches.append(batch)
        return False


async def test_qos1_messages_are_acknowledged_only_once_the_sink_says_they_are_stored(broker: Mosquitto) -> None:
    # Acknowledged, a QoS 1 message is the gateway's to keep: the broker will not send it again. So the source acks
    # only after its sink returns True (the outbox has committed it); refused, the broker keeps it for the session.
    config = source_config(broker.port, client_id="gw-ack-test", session="persistent")
    refused = RefusingCollector()
    source = MqttSource(config, [LIVING])
    async with running(source, refused):
        await wait_until(lambda: source.connected, what="connect")
        await publish(broker.port, [("zigbee2mqtt/Living Room", z2m(float(i))) for i in range(10)])
        await wait_until(lambda: len(refused.values("living_room.temperature")) == 10, what="first delivery")
    # the same session again: every message comes back, since none was acknowledged
    stored = Collector()
    again = MqttSource(config, [LIVING])
    async with running(again, stored):
        await wait_until(lambda: len(stored.values("living_room.temperature")) == 10, what="redelivery")
    assert stored.values("living_room.temperature") == [float(i) for i in range(10)]
    # and once stored (the Collector returns None, "handed on"), they are acknowledged: a third session gets nothing
    third = Collector()
    last = MqttSource(config, [LIVING])
    async with running(last, third):
        await wait_until(lambda: last.connected, what="third connect")
        await asyncio.sleep(1.0)  # time for the broker to deliver anything still unacknowledged
    assert third.samples == []
