"""Broker failover (issue 17 item 1) against two real Mosquitto brokers: the first is killed mid-stream and both MQTT
clients move to the second (``brokers:`` in gateway/mqtt_connection.py), losing nothing.

Platform side: the uplink acks the outbox only over PUBACKs, so what the killed broker held unacknowledged is sent
again to the second one with the same ``seq``: every reading arrives, and a reading never appears under two seqs
(the platform deduplicates on ``(seq, ts)``). Sensor side: the source reconnects to the second broker, resubscribes
and receives what is published there, and says which broker it uses and how many failovers happened."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from drivers.mqtt.config import MqttSourceConfig
from drivers.mqtt.source import MqttSource
from gateway.model import Sample
from gateway.mqtt_connection import BrokerAddress
from gateway.outbox import Outbox
from gateway.uplinks.mqtt import MqttUplink
from gateway.uplinks.runner import build_uplinks
from tests.integration.mqtt.test_mqtt_broker import LIVING, Collector, publish, running, wait_until, z2m
from tests.integration.uplinks.common import CommandRecorder, load, readings, wait_for
from tests.integration.uplinks.test_platform_mosquitto import now_ms, platform
from tests.services import Mosquitto

pytestmark = pytest.mark.integration

#: a long live window, so the readings appended while the first broker is frozen are sent as requests in flight
DELIVERY = "{batch_size: 200, live_window: 60s, retry_min: 0.05s, retry_max: 0.3s, timeout: 10s}"
READINGS = 600


def failover_config(*brokers: Mosquitto, **overrides: Any) -> MqttSourceConfig:
    """The integration tests' usual source, on a broker list instead of one host."""
    data = {
        "id": "building",
        "brokers": [f"127.0.0.1:{broker.port}" for broker in brokers],
        "keepalive": 5,
        "reconnect_min": "100ms",
        "reconnect_max": "500ms",
        "subscriptions": [{"id": "z2m", "topic": "zigbee2mqtt/+", "qos": 1, "decoder": {"type": "zigbee2mqtt"}}],
        **overrides,
    }
    return MqttSourceConfig.model_validate(data)


@pytest.fixture
def two_brokers() -> Iterator[tuple[Mosquitto, Mosquitto]]:
    first, second = Mosquitto(), Mosquitto()
    first.start()
    second.start()
    try:
        yield first, second
    finally:
        first.close()
        second.close()


async def test_the_platform_uplink_fails_over_mid_stream_and_loses_and_doubles_nothing(
    tmp_path: Path, two_brokers: tuple[Mosquitto, Mosquitto], caplog: pytest.LogCaptureFixture
) -> None:
    first, second = two_brokers
    caplog.set_level(logging.WARNING)
    site = load(
        tmp_path,
        f"  platform: {{brokers: ['127.0.0.1:{first.port}', 'mqtt://127.0.0.1:{second.port}'], prefix: fo,"
        f" delivery: {DELIVERY}}}\n",
    )
    outbox = Outbox(tmp_path / "outbox.db")
    t0 = 1_790_700_000_000
    (runner,) = build_uplinks(site, outbox, commands=CommandRecorder())
    base = "fo/tower/gw1"
    async with platform(first, base) as on_first, platform(second, base) as on_second:
        stopping = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(runner.run(stopping))
            await outbox.append(readings(0, 5, t0_ms=t0))
            await wait_for(lambda: len(on_first.on("telemetry/m1")) == 5, what="live on the first broker")
            assert runner.status()["broker"] == f"127.0.0.1:{first.port}"
            assert runner.status()["failovers"] == 0
            assert first.proc is not None
            caplog.clear()  # from here on: the freeze, the kill, the failover
            os.kill(first.proc.pid, signal.SIGSTOP)  # frozen: what is published now stays unacknowledged
            try:
                await outbox.append(readings(5, READINGS, t0_ms=t0))
                await wait_for(lambda: runner.status()["in_flight"] >= 1, what="publishes in flight")
                await asyncio.sleep(0.5)  # let the client hand the requests' messages to the frozen broker
            finally:
                first.kill()  # the connection dies with no PUBACK given for what was in flight
            await wait_for(
                lambda: (
                    len(
                        {m["ts"] for m in on_second.on("telemetry/m1")} | {m["ts"] for m in on_first.on("telemetry/m1")}
                    )
                    == READINGS + 5
                ),
                timeout=30,
                what="every reading, through the second broker",
            )
            await wait_for(lambda: runner.status()["backlog_samples"] == 0, what="the cursor at the end")
            status = runner.status()
            stopping.set()
    await outbox.close()
    assert status["broker"] == f"127.0.0.1:{second.port}"
    assert status["failovers"] == 1  # one move, to the second broker, which stayed up
    assert on_second.on("telemetry/m1"), "nothing went through the second broker"
    assert on_second.on("status")[0]["state"] == "online"  # the birth message on the new broker
    # a resend (to the second broker) repeats the seq: a reading is never under two seqs, none is missing
    by_ts: dict[int, int] = {}
    for message in on_first.on("telemetry/m1") + on_second.on("telemetry/m1"):
        assert by_ts.setdefault(message["ts"], message["seq"]) == message["seq"], message
    assert sorted(by_ts) == [t0 + i for i in range(READINGS + 5)]
    # the gateway's own lines: the delivery failing once, the failover once, no flood (paho's socket errors aside)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name != "mqtt"]
    assert any(f"failing over to 127.0.0.1:{second.port}" in w for w in warnings), warnings
    assert len(warnings) <= 2, warnings


async def test_the_sensor_source_fails_over_to_the_second_broker_and_resubscribes(
    two_brokers: tuple[Mosquitto, Mosquitto],
) -> None:
    first, second = two_brokers
    config = failover_config(first, second, session="persistent", client_id="failover-source")
    source = MqttSource(config, [LIVING])
    sink = Collector()
    async with running(source, sink):
        await wait_until(lambda: source.connected, what="connected to the first broker")
        assert source.status()[0].info == {"broker": f"127.0.0.1:{first.port}", "failovers": 0}
        await publish(first.port, [("zigbee2mqtt/Living Room", z2m(20.0 + i / 10)) for i in range(10)])
        await wait_until(lambda: len(sink.values("living_room.temperature")) == 10, what="ten on the first broker")

        first.kill()
        await wait_until(lambda: source.connected and source.connects == 2, what="connected to the second broker")
        assert source.brokers.current == BrokerAddress("127.0.0.1", second.port)
        await publish(second.port, [("zigbee2mqtt/Living Room", z2m(30.0 + i / 10)) for i in range(10)])
        await wait_until(lambda: len(sink.values("living_room.temperature")) == 20, what="ten on the second broker")
        status = source.status()[0]
        counters = source.source_counters()
    assert status.info == {"broker": f"127.0.0.1:{second.port}", "failovers": 1}
    assert counters["broker"] == f"127.0.0.1:{second.port}" and counters["failovers"] == 1
    assert sink.values("living_room.temperature") == [20.0 + i / 10 for i in range(10)] + [
        30.0 + i / 10 for i in range(10)
    ]


async def test_with_every_broker_down_the_source_backs_off_and_comes_back_on_whichever_returns(
    two_brokers: tuple[Mosquitto, Mosquitto],
) -> None:
    first, second = two_brokers
    config = failover_config(first, second)
    source = MqttSource(config, [LIVING])
    async with running(source, Collector()):
        await wait_until(lambda: source.connected, what="connected to the first broker")
        first.kill()
        second.kill()
        # both tried and failed, round after round: the source keeps going, counting the moves
        await wait_until(lambda: source.brokers.failovers >= 4, what="several rounds over the dead brokers")
        assert not source.connected
        second.start()
        await wait_until(lambda: source.connected, timeout=15, what="back, on the broker that returned")
        assert source.brokers.current == BrokerAddress("127.0.0.1", second.port)


class GatedCollector(Collector):
    """A sink that holds each batch until ``gate`` opens: the outbox still committing when the broker dies."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.holding = asyncio.Event()

    async def __call__(self, batch: list[Sample]) -> None:
        self.holding.set()
        await self.gate.wait()
        self.batches.append(batch)


async def test_messages_stored_after_the_failover_are_not_acked_and_come_back_from_their_brokers_session(
    two_brokers: tuple[Mosquitto, Mosquitto],
) -> None:
    # The source acks a QoS 1 message only after the outbox committed it, and only on the connection it came on. A
    # batch whose commit ends after the first broker died is stored, but its messages stay unacknowledged in the
    # first broker's persistent session, which delivers them again when the source is back on it: nothing is lost,
    # at worst a sample is stored twice (with the same timestamp: idempotent downstream).
    first, second = two_brokers
    config = failover_config(first, second, session="persistent", client_id="failover-acks")
    source = MqttSource(config, [LIVING])
    sink = GatedCollector()
    async with running(source, sink):
        await wait_until(lambda: source.connected, what="connected to the first broker")
        await publish(first.port, [("zigbee2mqtt/Living Room", z2m(float(i))) for i in range(10)])
        await asyncio.wait_for(sink.holding.wait(), 10)  # received, being committed, not acknowledged
        # stopped, not killed: mosquitto then saves its sessions on the way down (a SIGKILL keeps only its last
        # autosave, which races with this test); what matters here is that the session ended with the batch unacked
        await asyncio.to_thread(first.stop)
        await wait_until(lambda: source.connected and source.connects == 2, what="failed over to the second broker")
        sink.gate.set()  # the commit ends on the second broker's watch: its acks must not be sent anywhere
        await wait_until(lambda: len(sink.values("living_room.temperature")) == 10, what="the batch stored")

        first.start()  # the first broker back, with the session it saved
        second.kill()
        await wait_until(lambda: source.connected and source.connects == 3, timeout=15, what="back on the first")
        assert source.brokers.current == BrokerAddress("127.0.0.1", first.port)
        await wait_until(lambda: len(sink.values("living_room.temperature")) == 20, what="redelivered by its session")
    assert sink.values("living_room.temperature") == [float(i) for i in range(10)] * 2
    assert source.brokers.failovers == 2


async def test_the_uplinks_persistent_session_keeps_commands_sent_while_it_was_on_the_other_broker(
    tmp_path: Path, two_brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    # The platform uplink connects with a persistent session: the first broker keeps its command subscription while
    # the uplink is on the second, so a command sent to the first meanwhile is applied when the uplink comes back.
    first, second = two_brokers
    site = load(
        tmp_path,
        f"  platform: {{brokers: ['127.0.0.1:{first.port}', '127.0.0.1:{second.port}'], prefix: ps,"
        f" delivery: {DELIVERY}}}\n",
    )
    outbox = Outbox(tmp_path / "outbox.db")
    recorder = CommandRecorder()
    (runner,) = build_uplinks(site, outbox, commands=recorder)
    uplink = runner.uplink
    assert isinstance(uplink, MqttUplink)
    stopping = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(runner.run(stopping))
        await wait_for(uplink.connected.is_set, what="connected to the first")
        await asyncio.to_thread(first.stop)  # graceful: mosquitto saves the uplink's session on the way down
        await wait_for(lambda: runner.status()["broker"] == f"127.0.0.1:{second.port}", what="on the second")
        await wait_for(uplink.connected.is_set, what="connected to the second")
        await asyncio.to_thread(first.start)
        command = orjson.dumps({"v": 1, "id": "dr-away", "point": "m1.power_kw", "value": 40, "ts": now_ms()})
        await publish(first.port, [("ps/tower/gw1/cmd/write", command)])  # queued for the absent session
        assert recorder.commands == []
        second.kill()
        await wait_for(lambda: len(recorder.commands) == 1, timeout=20, what="the command, from the kept session")
        status = runner.status()
        stopping.set()
    await outbox.close()
    assert status["broker"] == f"127.0.0.1:{first.port}" and status["failovers"] == 2
    assert recorder.commands[0].point == "m1.power_kw" and recorder.commands[0].value == 40
