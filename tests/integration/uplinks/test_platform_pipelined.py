"""Issue 19: the pipelined platform uplink against a real Mosquitto.

* Telemetry v2 (one message per device and poll) across a broker kill and restart with publishes in flight: every
  reading arrives, in one message per poll (a QoS 1 repeat is the same message), and only acknowledged messages
  moved the outbox cursor.
* A congestion episode (the broker stops acknowledging, the publish window fills) is logged once when it starts
  and once when it ends, however many times ``send`` had to pause, and nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from gateway.model import Quality, Sample
from gateway.outbox import Outbox
from gateway.uplinks.runner import build_uplinks
from tests.integration.uplinks.common import CommandRecorder, load, wait_for
from tests.integration.uplinks.test_platform_mosquitto import platform
from tests.services import Mosquitto

pytestmark = pytest.mark.integration

DELIVERY = "{batch_size: 400, live_window: 60s, retry_min: 0.05s, retry_max: 0.3s, timeout: 10s}"
T0_MS = 1_790_700_000_000


def polls(start: int, count: int, devices: tuple[str, ...] = ("m1", "m2")) -> list[list[Sample]]:
    """One batch per device and poll, each read in two requests 5 ms apart (as a device of two Modbus reads is)."""
    return [
        [
            Sample(f"{device}.power_kw", round(1.5 + i * 0.25, 3), (T0_MS + i * 1000) * 1_000_000, Quality.GOOD),
            Sample(f"{device}.energy_kwh", 1000.0 + i, (T0_MS + i * 1000) * 1_000_000, Quality.GOOD),
            Sample(f"{device}.voltage", 230.0 + i % 7, (T0_MS + i * 1000 + 5) * 1_000_000, Quality.GOOD),
        ]
        for i in range(start, start + count)
        for device in devices
    ]


def received(messages: list[dict[str, Any]]) -> list[tuple[int, int, str, object]]:
    """(seq, ts, point, value) of every value in v2 messages, in arrival order."""
    return [
        (doc["seq"], read["ts"], name, value)
        for doc in messages
        for read in doc["reads"]
        for name, value in read["values"].items()
    ]


def expected(start: int, count: int) -> set[tuple[int, str, object]]:
    out: set[tuple[int, str, object]] = set()
    for i in range(start, start + count):
        ts = T0_MS + i * 1000
        out |= {(ts, "power_kw", round(1.5 + i * 0.25, 3)), (ts, "energy_kwh", 1000.0 + i)}
        out.add((ts + 5, "voltage", 230.0 + i % 7))
    return out


async def test_v2_across_a_broker_kill_nothing_is_lost_and_nothing_arrives_twice(
    tmp_path: Path, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    site = load(
        tmp_path,
        f"  platform: {{host: 127.0.0.1, port: {broker.port}, prefix: pipe, telemetry_version: 2, "
        f"max_inflight_messages: 50, delivery: {DELIVERY}}}\n",
    )
    outbox = Outbox(tmp_path / "outbox.db")
    (runner,) = build_uplinks(site, outbox, commands=CommandRecorder())
    before, during = 5, 400
    async with platform(broker, "pipe/tower/gw1") as seen:
        stopping = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(runner.run(stopping))
            for batch in polls(0, before):
                await outbox.append(batch)
            await wait_for(lambda: len(seen.on("telemetry/m1")) == before, what="live before the kill")
            # one message per device and poll, each with the poll's two reads
            assert all(len(doc["reads"]) == 2 and doc["v"] == 2 for doc in seen.on("telemetry/m1"))
            acked_before = 2 * before  # stored batches: one per device and poll
            await wait_for(lambda: outbox.uplink_cursor("platform").delivered_to == acked_before, what="the acks")
            await asyncio.sleep(1.2)  # past the broker's autosave: the platform's session survives the kill
            assert broker.proc is not None
            os.kill(broker.proc.pid, signal.SIGSTOP)  # frozen: what is published now stays unacknowledged
            try:
                for batch in polls(before, during):
                    await outbox.append(batch)
                await wait_for(lambda: runner.status()["in_flight"] >= 1, what="publishes in flight")
                await asyncio.sleep(0.5)  # the window fills with messages the frozen broker will never acknowledge
                # nothing unacknowledged moved the cursor
                assert outbox.uplink_cursor("platform").delivered_to == acked_before
                failed_before = runner.status()["requests_failed"]
            finally:
                broker.kill()  # SIGKILL reaches a stopped process: the connection dies with no ack given
            await wait_for(lambda: runner.status()["requests_failed"] > failed_before, what="the send to fail")
            assert outbox.uplink_cursor("platform").delivered_to == acked_before
            broker.start()
            total = before + during
            await wait_for(lambda: len(seen.on("telemetry/m2")) >= total, timeout=30, what="everything")
            await wait_for(lambda: runner.status()["backlog_samples"] == 0, what="the cursor at the head")
            stopping.set()
    await outbox.close()
    for device in ("m1", "m2"):
        by_seq: dict[int, dict[str, Any]] = {}
        for doc in seen.on(f"telemetry/{device}"):
            # a message seen twice (QoS 1 is at least once: a broker restored from its autosave may deliver again
            # what its subscriber had not acknowledged) is the same message, seq and body
            assert by_seq.setdefault(doc["seq"], doc) == doc
        assert len(by_seq) == total  # one message per device and poll, each poll once
        values = received(list(by_seq.values()))
        # nothing lost: every value of every poll; nothing twice: no reading under two messages
        assert {(ts, name, value) for _seq, ts, name, value in values} == expected(0, total)
        assert len(values) == 3 * total
    assert not [r for r in caplog.records if "pending publish calls" in r.getMessage()]


async def test_a_congestion_episode_is_logged_once_at_its_start_and_once_at_its_end(
    tmp_path: Path, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.uplinks.mqtt")
    # a window of 4 messages and v1 (two messages per device and poll): 200 polls need the window 200 times over
    site = load(
        tmp_path,
        f"  platform: {{host: 127.0.0.1, port: {broker.port}, prefix: jam, max_inflight_messages: 4, "
        f"delivery: {DELIVERY}}}\n",
    )
    outbox = Outbox(tmp_path / "outbox.db")
    (runner,) = build_uplinks(site, outbox, commands=CommandRecorder())
    count = 200
    async with platform(broker, "jam/tower/gw1") as seen:
        stopping = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(runner.run(stopping))
            await wait_for(lambda: runner.status()["state"] == "up" and runner.uplink.connected.is_set())  # type: ignore[attr-defined]
            assert broker.proc is not None
            os.kill(broker.proc.pid, signal.SIGSTOP)  # no acknowledgement while frozen: the window fills
            try:
                # ten polls a stored batch: the first request alone overfills the window
                batches = polls(0, count, devices=("m1",))
                for first in range(0, count, 10):
                    await outbox.append([s for batch in batches[first : first + 10] for s in batch])
                await wait_for(
                    lambda: any("window is full" in r.getMessage() for r in caplog.records), what="the congestion"
                )
                await asyncio.sleep(0.3)
            finally:
                os.kill(broker.proc.pid, signal.SIGCONT)  # thawed within the keepalive: the connection lives on
            await wait_for(lambda: len(seen.on("telemetry/m1")) >= 2 * count, timeout=30, what="everything")
            await wait_for(lambda: any("drained" in r.getMessage() for r in caplog.records), what="the episode's end")
            stopping.set()
    await outbox.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.uplinks.mqtt"]
    starts = [line for line in lines if "window is full" in line]
    ends = [line for line in lines if "drained" in line]
    assert len(starts) == 1, lines
    assert len(ends) == 1, lines
    paused = int(ends[0].split("(")[1].split()[0])
    assert paused >= 2  # the one episode spanned many pauses of send, each of them silent
    assert runner.status()["requests_failed"] == 0  # congestion is not a failure: no resend, no backoff
    assert sorted({(m["ts"], m["seq"]) for m in seen.on("telemetry/m1")}) == sorted(
        (m["ts"], m["seq"]) for m in seen.on("telemetry/m1")
    )  # nothing twice


async def test_qos0_telemetry_completes_when_written_and_events_stay_qos1(tmp_path: Path, broker: Mosquitto) -> None:
    """QoS 0 has no PUBACK: paho reports a message done once written, and the request completes on that count."""
    site = load(
        tmp_path,
        f"  platform: {{host: 127.0.0.1, port: {broker.port}, prefix: q0, qos: 0, telemetry_version: 2, "
        f"delivery: {DELIVERY}}}\n",
    )
    outbox = Outbox(tmp_path / "outbox.db")
    (runner,) = build_uplinks(site, outbox, commands=CommandRecorder())
    async with platform(broker, "q0/tower/gw1") as seen:
        stopping = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(runner.run(stopping))
            await wait_for(runner.uplink.connected.is_set)  # type: ignore[attr-defined]
            for batch in polls(0, 50):
                await outbox.append(batch)
            await wait_for(lambda: outbox.uplink_cursor("platform").delivered_to == 100, what="every request done")
            await wait_for(lambda: len(seen.on("telemetry/m2")) == 50, what="the messages")
            stopping.set()
    await outbox.close()
    assert {(ts, n, v) for _seq, ts, n, v in received(seen.on("telemetry/m1"))} == expected(0, 50)
    assert runner.status()["requests_failed"] == 0
