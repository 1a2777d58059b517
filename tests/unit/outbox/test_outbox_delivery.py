"""The outbox's delivery side: budgets (telemetry drops oldest, events never), cursors with a backlog gap,
compaction, crash safety of positions, and a store that cannot be written."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.errors import StoreError
from gateway.model import Event, Quality, Sample
from gateway.outbox import Outbox, UplinkCursor


def batch(start: int, count: int = 10) -> list[Sample]:
    return [Sample("m1.energy_kwh", float(i), 1_000 + i, Quality.GOOD) for i in range(start, start + count)]


async def test_over_budget_telemetry_drops_oldest_counts_per_cursor_and_leaves_events_alone(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db", telemetry_budget=4_000, event_budget=1_000_000)
    await outbox.register_cursor("influx", "telemetry")
    await outbox.register_cursor("platform", "telemetry")
    await outbox.ack("platform", "telemetry", 2)  # platform already delivered the first two batches
    await outbox.append_events([Event("inc-1", "incentive", "acct-9", 5, {"kwh": 1.5})])
    for i in range(40):
        await outbox.append(batch(i * 10))
    stats = outbox.stats
    assert stats.telemetry_bytes <= 4_000
    assert stats.dropped_samples > 0
    assert stats.dropped_samples == 400 - stats.telemetry_samples
    assert stats.dropped_by_cursor["influx"] == stats.dropped_samples
    assert stats.dropped_by_cursor["platform"] == stats.dropped_samples - 20  # it had those two batches already
    kept = outbox.read_telemetry_upto(0, upto_seq=None, max_samples=10_000)
    assert [s.value for b in kept for s in b.samples] == [float(i) for i in range(400 - stats.telemetry_samples, 400)]
    assert [e.event.id for e in outbox.read_events(0)] == ["inc-1"]
    await outbox.close()

    reopened = Outbox(tmp_path / "o.db", telemetry_budget=4_000)  # the counters are on disk, not only in memory
    assert reopened.stats.dropped_samples == stats.dropped_samples
    assert reopened.stats.dropped_by_cursor == stats.dropped_by_cursor
    await reopened.close()


async def test_events_are_never_dropped_over_budget_they_raise_the_alarm_and_telemetry_gives_way(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path / "o.db", telemetry_budget=8_000, event_budget=500)
    for i in range(10):
        await outbox.append(batch(i * 10))
    assert outbox.stats.dropped_samples == 0
    events = [Event(f"inc-{i}", "incentive", "acct", i, {"pad": "x" * 200}) for i in range(20)]
    assert await outbox.append_events(events) == 20
    assert outbox.stats.event_store_full is True
    assert outbox.stats.event_count == 20
    assert len(outbox.read_events(0, limit=100)) == 20
    overflow = outbox.stats.event_bytes - 500
    assert outbox.stats.telemetry_bytes <= 8_000 - overflow  # the events' overflow came out of telemetry's budget
    assert outbox.stats.dropped_samples > 0
    await outbox.close()


async def test_event_append_is_idempotent_by_id(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    event = Event("inc-7", "incentive", "acct", 1, {"kwh": 2})
    assert await outbox.append_events([event]) == 1
    assert await outbox.append_events([event]) == 0
    assert outbox.has_event("inc-7")
    assert not outbox.has_event("inc-8")
    await outbox.close()


async def test_cursor_moves_are_atomic_never_backwards_and_survive_reopening(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    for i in range(6):
        await outbox.append(batch(i * 10))
    await outbox.register_cursor("influx", "telemetry")
    await outbox.move_cursors("influx", {"telemetry": 2, "telemetry.gap": 5, "telemetry.live": 6})
    await outbox.move_cursors("influx", {"telemetry": 1})  # a late ack of an older request: ignored
    assert outbox.uplink_cursor("influx") == UplinkCursor(2, 5, 6)
    await outbox.close()
    reopened = Outbox(tmp_path / "o.db")
    cursor = reopened.uplink_cursor("influx")
    assert cursor == UplinkCursor(2, 5, 6)
    assert [cursor.delivered(s) for s in range(1, 8)] == [True, True, False, False, False, True, False]
    assert reopened.pending_telemetry(2, 5)[0] == 30
    await reopened.close()


async def test_compaction_keeps_what_the_slowest_uplink_has_not_delivered(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    for i in range(5):
        await outbox.append(batch(i * 10))
    await outbox.register_cursor("influx", "telemetry")
    await outbox.register_cursor("platform", "telemetry")
    await outbox.move_cursors("influx", {"telemetry": 5})
    await outbox.move_cursors("platform", {"telemetry": 1, "telemetry.gap": 3, "telemetry.live": 5})
    removed = await outbox.compact()
    assert removed["telemetry"] == 1  # the platform still replays 2..3: they stay
    assert [b.seq for b in outbox.read_telemetry(0)] == [2, 3, 4, 5]
    assert outbox.stats.telemetry_samples == 40
    await outbox.close()


async def test_read_upto_stops_at_the_sample_limit_but_always_returns_one_batch(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    await outbox.append(batch(0, 50))
    await outbox.append(batch(50, 10))
    await outbox.append(batch(60, 10))
    assert [b.seq for b in outbox.read_telemetry_upto(0, upto_seq=None, max_samples=20)] == [1]
    assert [b.seq for b in outbox.read_telemetry_upto(1, upto_seq=None, max_samples=20)] == [2, 3]
    assert [b.seq for b in outbox.read_telemetry_upto(1, upto_seq=2, max_samples=20)] == [2]
    await outbox.close()


async def test_append_listeners_are_called_after_each_commit(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    calls: list[int] = []
    outbox.add_append_listener(lambda: calls.append(outbox.last_seq("telemetry")))
    await outbox.append(batch(0))
    await outbox.append(batch(10))
    assert calls == [1, 2]
    await outbox.close()


async def test_a_store_that_cannot_be_created_is_a_store_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("a file where the data directory should be")
    with pytest.raises(StoreError, match="cannot open outbox"):
        Outbox(not_a_dir / "o.db")


async def test_a_failing_disk_fails_the_append_marks_the_store_unwritable_and_loses_nothing_committed(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path / "o.db")
    await outbox.append(batch(0))
    blocker = sqlite3.connect(tmp_path / "o.db", timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the lock: the outbox's commit cannot happen
    outbox._db.execute("PRAGMA busy_timeout=50")
    with pytest.raises(StoreError, match="outbox write failed"):
        await outbox.append(batch(10))
    assert not outbox.writable()
    blocker.rollback()
    blocker.close()
    await outbox.append(batch(20))
    assert outbox.writable()
    assert [b.samples[0].value for b in outbox.read_telemetry(0)] == [0.0, 20.0]
    await outbox.close()
