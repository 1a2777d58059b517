"""The outbox's core contract: append, read from a cursor, ack, reopen, and nothing committed lost on kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.errors import StoreError
from gateway.model import Event, Quality, Sample
from gateway.outbox import Outbox


def _batch(i: int) -> list[Sample]:
    return [
        Sample(f"m{i % 3}.energy_kwh", 1000.0 + i, 1_700_000_000_000_000_000 + i, Quality.GOOD),
        Sample(f"m{i % 3}.power_kw", None, 1_700_000_000_000_000_000 + i, Quality.BAD),
    ]


async def test_append_read_ack_and_reopen(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    for i in range(10):
        await outbox.append(_batch(i))
    await outbox.register_cursor("influx", "telemetry")
    first = outbox.read_telemetry(outbox.cursor("influx", "telemetry"), limit=4)
    assert [b.samples[0].value for b in first] == [1000.0, 1001.0, 1002.0, 1003.0]
    assert first[0].samples[1].quality is Quality.BAD and first[0].samples[1].value is None
    await outbox.ack("influx", "telemetry", first[-1].seq)
    await outbox.ack("influx", "telemetry", first[0].seq)  # a late, older ack never moves the cursor back
    await outbox.close()

    reopened = Outbox(tmp_path / "o.db")
    try:
        cursor = reopened.cursor("influx", "telemetry")
        assert cursor == first[-1].seq
        rest = reopened.read_telemetry(cursor, limit=100)
        assert [b.samples[0].value for b in rest] == [1004.0 + i for i in range(6)]
        assert reopened.stats.telemetry_samples == 20
    finally:
        await reopened.close()


async def test_compaction_keeps_what_any_uplink_still_needs(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    try:
        for i in range(6):
            await outbox.append(_batch(i))
        await outbox.register_cursor("influx", "telemetry")
        await outbox.register_cursor("platform", "telemetry")
        batches = outbox.read_telemetry(0, limit=10)
        await outbox.ack("influx", "telemetry", batches[4].seq)
        await outbox.ack("platform", "telemetry", batches[1].seq)
        removed = await outbox.compact()
        assert removed["telemetry"] == 2  # only what the slowest uplink acked
        assert [b.seq for b in outbox.read_telemetry(0, limit=10)] == [b.seq for b in batches[2:]]
    finally:
        await outbox.close()


async def test_events_are_idempotent_by_id(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    try:
        event = Event("incentive:acct1:2026-11-26T10:00", "incentive", "acct1", 1, {"kwh": "1.25"})
        assert await outbox.append_events([event]) == 1
        assert await outbox.append_events([event]) == 0  # a replay after a crash is not a second record
        stored = outbox.read_events(0)
        assert [s.event for s in stored] == [event]
    finally:
        await outbox.close()


async def test_telemetry_over_budget_drops_oldest_and_counts(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db", telemetry_budget=2000)
    try:
        for i in range(40):
            await outbox.append(_batch(i))
        assert outbox.stats.telemetry_bytes <= 2000
        assert outbox.stats.dropped_samples > 0
        kept = outbox.read_telemetry(0, limit=100)
        assert kept[-1].samples[0].value == 1039.0  # the newest survive
        assert outbox.stats.dropped_samples + outbox.stats.telemetry_samples == 80
    finally:
        await outbox.close()


async def test_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open outbox"):
        Outbox(blocker / "o.db")


async def test_closed_outbox_refuses_appends(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    await outbox.close()
    with pytest.raises(StoreError, match="closed"):
        await outbox.append(_batch(0))


_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.model import Sample
    from gateway.outbox import Outbox

    async def main() -> None:
        outbox = Outbox(sys.argv[1])
        i = 0
        while True:
            await outbox.append([Sample("m1.energy_kwh", float(i), i)])
            print(i, flush=True)  # printed only after the commit returned
            i += 1

    asyncio.run(main())
    """
)


def test_kill_9_of_a_writer_loses_nothing_committed(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(db)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    committed = -1
    for line in proc.stdout:
        committed = int(line)
        if committed >= 300:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()

    async def check() -> None:
        outbox = Outbox(db)
        try:
            values = [int(b.samples[0].value) for b in outbox.read_telemetry(0, limit=100_000)]  # type: ignore[arg-type]
            # everything acknowledged as committed is there, in order, once
            assert values[: committed + 1] == list(range(committed + 1))
            assert values == sorted(set(values))
            await outbox.append([Sample("m1.energy_kwh", -1.0, 0)])  # and the store is writable again
        finally:
            await outbox.close()

    asyncio.run(check())
