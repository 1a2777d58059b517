"""MqttUplink against a real Mosquitto: the topic contract (birth, retained meta, telemetry with seq, events with
ids, rule publications, death on stop), a broker outage with ordered, flagged backfill, and platform commands.
The Last Will (death by SIGKILL) is shown in test_gateway_kill.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest

from gateway.model import Event, Quality, Sample
from gateway.outbox import Outbox
from gateway.uplinks.runner import build_uplinks
from tests.integration.uplinks.common import FAST_DELIVERY, CommandRecorder, load, readings, wait_for
from tests.services import Mosquitto

pytestmark = pytest.mark.integration


def platform_site(tmp_path: Path, broker: Mosquitto, prefix: str) -> Any:
    return load(
        tmp_path,
        f"  platform: {{host: 127.0.0.1, port: {broker.port}, prefix: {prefix}, delivery: {FAST_DELIVERY}}}\n",
    )


class Platform:
    """The city platform's side: a persistent QoS 1 subscriber that records every message under the base topic."""

    def __init__(self, broker: Mosquitto, base: str) -> None:
        self.broker = broker
        self.base = base
        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        #: the bytes as the broker delivered them, by topic
        self.raw: list[tuple[str, bytes]] = []

    def on(self, suffix: str) -> list[dict[str, Any]]:
        return [payload for topic, payload, _retain in self.messages if topic == f"{self.base}/{suffix}"]

    async def listen(self, ready: asyncio.Event) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", port=self.broker.port, identifier=f"platform-{self.base}", clean_session=False
                ) as client:
                    await client.subscribe(f"{self.base}/#", qos=1)
                    ready.set()
                    async for message in client.messages:
                        if message.topic.value.startswith(f"{self.base}/cmd/"):
                            continue  # the platform's own requests (one of them deliberately not JSON)
                        payload = orjson.loads(message.payload) if message.payload else {}  # type: ignore[arg-type]
                        assert isinstance(message.payload, bytes)
                        self.raw.append((message.topic.value, message.payload))
                        self.messages.append((message.topic.value, payload, message.retain))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)  # the broker is down: the platform reconnects, its session kept


@contextlib.asynccontextmanager
async def platform(broker: Mosquitto, base: str) -> AsyncIterator[Platform]:
    listener = Platform(broker, base)
    ready = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(listener.listen(ready))
        await asyncio.wait_for(ready.wait(), 5)
        try:
            yield listener
        finally:
            task.cancel()


async def test_contract_birth_meta_telemetry_events_publications_and_death(tmp_path: Path, broker: Mosquitto) -> None:
    site = platform_site(tmp_path, broker, "contract")
    outbox = Outbox(tmp_path / "outbox.db")
    base = "contract/tower/gw1"
    t0 = 1_790_400_000_000
    samples = readings(0, 3, t0_ms=t0)
    samples.append(Sample("m2.voltage", 229.5, t0 * 1_000_000, Quality.UNCERTAIN))
    samples.append(Sample("m2.current", None, t0 * 1_000_000, Quality.BAD))
    await outbox.append(samples)
    await outbox.append_events(
        [
            Event("alarm-1", "alarm", "m1.power_kw", t0 * 1_000_000, {"message": "power high", "value": 99.5}),
            Event("pub-bad", "publish", "status", t0 * 1_000_000, {"spoof": True}),  # must not overwrite status
            Event("pub-1", "publish", "alerts/zone3/co2", t0 * 1_000_000, {"co2": 1250}),
        ]
    )
    (runner,) = build_uplinks(site, outbox, commands=CommandRecorder())
    async with platform(broker, base) as seen:
        stopping = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(runner.run(stopping))
            await wait_for(lambda: len(seen.on("telemetry/m1")) == 3 and seen.on("events/alarm"), what="delivery")
            await wait_for(lambda: bool(seen.on("alerts/zone3/co2")), what="publication")
            stopping.set()
        await wait_for(lambda: seen.on("status")[-1]["state"] == "offline", what="offline status")
    await outbox.close()

    status = seen.on("status")
    assert status[0]["state"] == "online" and status[-1] == status[-1] | {"state": "offline", "reason": "stopped"}
    (meta,) = seen.on("meta")
    assert meta["devices"]["m1"]["points"]["energy_kwh"]["unit"] == "kWh"
    assert meta["devices"]["m2"]["points"]["power_kw"]["tags"] == {"device": "m2", "floor": "2"}
    m1 = seen.on("telemetry/m1")
    assert [(m["seq"], m["ts"], m["values"]) for m in m1] == [
        (1, t0 + i, {"power_kw": round(1.5 + i * 0.25, 3), "energy_kwh": 1000.0 + i}) for i in range(3)
    ]
    assert not any(m.get("historical") for m in m1)
    (m2,) = seen.on("telemetry/m2")
    assert m2["values"] == {"voltage": 229.5}
    assert m2["quality"] == {"voltage": "uncertain", "current": "bad"}
    (alarm,) = seen.on("events/alarm")
    assert alarm == {
        "v": 1, "id": "alarm-1", "type": "alarm", "subject": "m1.power_kw", "ts": t0,
        "body": {"message": "power high", "value": 99.5},
    }  # fmt: skip
    assert seen.on("alerts/zone3/co2") == [{"v": 1, "id": "pub-1", "ts": t0, "payload": {"co2": 1250}}]
    assert runner.status()["quarantined"] == 1  # the publication aimed at the gateway's own status topic
    assert all("spoof" not in s for s in status)


async def test_broker_outage_backfill_arrives_in_order_flagged_historical(tmp_path: Path, broker: Mosquitto) -> None:
    site = platform_site(tmp_path, broker, "outage")
    outbox = Outbox(tmp_path / "outbox.db")
    base = "outage/tower/gw1"
    t0 = 1_790_500_000_000
    (runner,) = build_uplinks(site, outbox, commands=CommandRecorder())
    async with platform(broker, base) as seen:
        stopping = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(runner.run(stopping))
            await outbox.append(readings(0, 5, t0_ms=t0))
            await wait_for(lambda: len(seen.on("telemetry/m1")) == 5, what="live before the outage")
            broker.kill()  # no goodbye: the gateway's connection just dies
            for i in range(5, 25):
                await outbox.append(readings(i, 1, t0_ms=t0))
                await asyncio.sleep(0.03)
            await wait_for(lambda: runner.status()["state"] == "retrying", what="retrying")
            await asyncio.sleep(0.6)  # past the live window
            broker.start()
            await wait_for(
                lambda: runner.status()["backlog_samples"] == 0 and not runner.status()["replaying"],
                timeout=20,
                what="replay",
            )
            await outbox.append(readings(25, 1, t0_ms=t0))
            await wait_for(lambda: len({m["ts"] for m in seen.on("telemetry/m1")}) == 26, what="all readings")
            stopping.set()
    await outbox.close()
    m1 = seen.on("telemetry/m1")
    by_ts: dict[int, dict[str, Any]] = {}
    for message in m1:  # a resend repeats seq, ts and values exactly
        assert by_ts.setdefault(message["ts"], message)["values"] == message["values"]
        assert by_ts[message["ts"]]["seq"] == message["seq"]
    assert sorted(by_ts) == [t0 + i for i in range(26)]
    backfill = [m["ts"] - t0 for m in m1 if m.get("historical")]
    assert backfill == sorted(backfill) and set(backfill) >= set(range(5, 25))  # in order, every outage reading
    assert not by_ts[t0 + 25].get("historical")
    assert runner.status()["replayed_samples"] >= 40


async def test_platform_commands_are_applied_through_the_handler_once_refused_with_a_reason_and_answered(
    tmp_path: Path, broker: Mosquitto
) -> None:
    site = platform_site(tmp_path, broker, "cmd")
    outbox = Outbox(tmp_path / "outbox.db")
    base = "cmd/tower/gw1"
    recorder = CommandRecorder()
    (runner,) = build_uplinks(site, outbox, commands=recorder)
    async with platform(broker, base) as seen:
        stopping = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(runner.run(stopping))
            await wait_for(lambda: bool(seen.on("status")), what="online")
            async with aiomqtt.Client("127.0.0.1", port=broker.port, identifier="platform-operator") as operator:
                ok = orjson.dumps({"v": 1, "id": "dr-1", "point": "m1.power_kw", "value": 40, "ts": now_ms()})
                await operator.publish(f"{base}/cmd/write", ok, qos=1)
                await operator.publish(f"{base}/cmd/write", ok, qos=1)  # redelivered: applied once
                refused = orjson.dumps({"v": 1, "id": "dr-2", "point": "m2.voltage", "value": 1, "ts": now_ms()})
                await operator.publish(f"{base}/cmd/write", refused, qos=1)
                await operator.publish(f"{base}/cmd/write", b"{not json", qos=1)
            await wait_for(lambda: len(seen.on("events/command_result")) >= 3, what="results")
            stopping.set()
    await outbox.close()
    assert [c.point for c in recorder.commands] == ["m1.power_kw"]
    assert recorder.commands[0].origin == "platform"
    results = {r["subject"]: r["body"] for r in seen.on("events/command_result")}
    assert results["dr-1"]["status"] == "applied"
    assert results["dr-2"]["status"] == "refused"
    assert "not in any allow list" in results["dr-2"]["message"]
    (invalid,) = [body for subject, body in results.items() if subject.startswith("invalid-")]
    assert invalid["status"] == "invalid" and "not JSON" in invalid["message"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_a_repeated_command_is_answered_with_the_first_result_bytes_after_compaction_and_a_restart(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """Issue 12: a command re-sent after its result was compacted away, and again after a restart, was applied
    again (78 then 79 under one id). Now the device sees one write and every answer is the first one, byte for
    byte; another payload under the same id is refused under a result id of its own."""
    site = platform_site(tmp_path, broker, "once")
    base = "once/tower/gw1"
    recorder = CommandRecorder()
    command = orjson.dumps({"v": 1, "id": "dr-once", "point": "m1.power_kw", "value": 78, "ts": now_ms()})
    other = orjson.dumps({"v": 1, "id": "dr-once", "point": "m1.power_kw", "value": 79, "ts": now_ms()})
    topic = f"{base}/events/command_result"

    def answers() -> list[bytes]:
        return [payload for t, payload in seen.raw if t == topic]

    async with platform(broker, base) as seen:
        for restart in (False, True):  # the same data directory: a new Outbox, a new journal connection
            outbox = Outbox(tmp_path / "outbox.db")
            (runner,) = build_uplinks(site, outbox, commands=recorder)
            stopping = asyncio.Event()
            async with (
                asyncio.TaskGroup() as tg,
                aiomqtt.Client("127.0.0.1", port=broker.port, identifier="platform-operator") as operator,
            ):
                tg.create_task(runner.run(stopping))
                await wait_for(runner.uplink.connected.is_set, what="connected and subscribed")  # type: ignore[attr-defined]
                if not restart:
                    await operator.publish(f"{base}/cmd/write", command, qos=1)
                    await wait_for(lambda: len(answers()) >= 1, what="first result")
                    # delivered, then compacted away: the outbox no longer knows the result
                    deadline = time.monotonic() + 10
                    while outbox.has_event("cmd-result:dr-once"):
                        assert time.monotonic() < deadline, "the result was never compacted"
                        await outbox.compact()
                        await asyncio.sleep(0.05)
                await operator.publish(f"{base}/cmd/write", command, qos=1)
                await wait_for(lambda want=(3 if restart else 2): len(answers()) >= want, what="repeated result")
                if restart:
                    await operator.publish(f"{base}/cmd/write", other, qos=1)
                    await wait_for(lambda: len(answers()) >= 4, what="conflict result")
                stopping.set()
            await outbox.close()

    first, *repeats, conflict = answers()
    assert repeats == [first, first]
    assert orjson.loads(first)["body"]["status"] == "applied"
    assert [c.value for c in recorder.commands] == [78]  # the device saw one write
    refused = orjson.loads(conflict)
    assert refused["subject"] == "dr-once" and refused["id"] != orjson.loads(first)["id"]
    assert refused["body"]["status"] == "refused" and "already used" in refused["body"]["message"]
