"""Issue 12: a 3 s broker bounce with platform publishes in flight. The send fails as soon as the connection is
lost (not after the 10 s delivery timeout), aiomqtt does not flood the log with "pending publish calls", and every
reading arrives after the reconnection (re-sent from the outbox with the same seq)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from gateway.outbox import Outbox
from gateway.uplinks.runner import build_uplinks
from tests.integration.uplinks.common import CommandRecorder, load, readings, wait_for
from tests.integration.uplinks.test_platform_mosquitto import platform
from tests.services import Mosquitto

pytestmark = pytest.mark.integration

#: the default delivery timeout, so a send that waited for it could not pass for a prompt failure
DELIVERY = "{batch_size: 500, live_window: 60s, retry_min: 0.05s, retry_max: 0.3s, timeout: 10s}"
READINGS = 600


async def test_a_broker_bounce_fails_sends_in_flight_at_once_without_a_warning_flood_and_loses_nothing(
    tmp_path: Path, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    site = load(
        tmp_path, f"  platform: {{host: 127.0.0.1, port: {broker.port}, prefix: bounce, delivery: {DELIVERY}}}\n"
    )
    outbox = Outbox(tmp_path / "outbox.db")
    t0 = 1_790_600_000_000
    (runner,) = build_uplinks(site, outbox, commands=CommandRecorder())
    async with platform(broker, "bounce/tower/gw1") as seen:
        stopping = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(runner.run(stopping))
            await outbox.append(readings(0, 5, t0_ms=t0))
            await wait_for(lambda: len(seen.on("telemetry/m1")) == 5, what="live before the bounce")
            await asyncio.sleep(1.2)  # past the broker's autosave: the platform's session survives the kill
            assert broker.proc is not None
            caplog.clear()  # from here on: the publishes into the frozen broker, the bounce, the catch-up
            os.kill(broker.proc.pid, signal.SIGSTOP)  # frozen: what is published now stays unacknowledged
            try:
                await outbox.append(readings(5, READINGS, t0_ms=t0))
                await wait_for(lambda: runner.status()["in_flight"] >= 1, what="publishes in flight")
                await asyncio.sleep(0.5)  # every message of the requests in flight handed to the client
                failed_before = runner.status()["requests_failed"]  # a send before the first connection fails
                killed = time.monotonic()
            finally:
                broker.kill()  # SIGKILL reaches a stopped process: the connection dies with no ack given
            await wait_for(
                lambda: runner.status()["requests_failed"] > failed_before, timeout=12, what="the send to fail"
            )
            failed_after = time.monotonic() - killed
            await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - killed)))
            broker.start()
            await wait_for(
                lambda: len({m["ts"] for m in seen.on("telemetry/m1")}) == READINGS + 5, timeout=20, what="all"
            )
            stopping.set()
    await outbox.close()
    assert failed_after < 2.0, f"the send in flight failed only after {failed_after:.1f}s"
    pending_warnings = [r for r in caplog.records if "pending publish calls" in r.getMessage()]
    assert pending_warnings == []
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 3, [r.getMessage() for r in warnings]  # the outage, logged once per side
    by_ts: dict[int, int] = {}
    for message in seen.on("telemetry/m1"):  # a resend repeats the seq
        assert by_ts.setdefault(message["ts"], message["seq"]) == message["seq"]
    assert sorted(by_ts) == [t0 + i for i in range(READINGS + 5)]
