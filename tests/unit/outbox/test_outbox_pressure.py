"""The outbox under pressure: telemetry over its budget is logged once per episode (a WARNING at the first drop, one
summary when delivery brings the store back under), only undelivered rows count as dropped, and the files on disk
(database, WAL, shared memory) stay within the budget plus the documented margin."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gateway.model import Event, Quality, Sample
from gateway.outbox import Outbox

T0 = 1_800_000_000_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now_ns = T0

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * 1e9)


def batch(start: int, count: int = 10) -> list[Sample]:
    return [Sample("m1.energy_kwh", float(i), 1_000 + i, Quality.GOOD) for i in range(start, start + count)]


def outbox_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.outbox" and r.levelno == level]


async def test_one_warning_per_episode_and_one_summary_when_delivery_brings_the_store_back_under(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.outbox")
    clock = FakeClock()
    outbox = Outbox(tmp_path / "o.db", telemetry_budget=4_000, time_ns=clock)
    await outbox.register_cursor("influx", "telemetry")  # and it stalls: nothing is acked
    first_drop_ns = None
    for i in range(60):
        await outbox.append(batch(i * 10))
        if first_drop_ns is None and outbox.stats.dropped_samples:
            first_drop_ns = clock.now_ns
        clock.advance(1)
    assert first_drop_ns is not None
    warnings = outbox_records(caplog, logging.WARNING)
    assert len(warnings) == 1, warnings  # not one per append
    assert "over its budget (4000 bytes)" in warnings[0]
    assert "dropped the oldest undelivered telemetry, " in warnings[0]
    assert outbox.stats.pressure_since_ns is not None
    assert outbox_records(caplog, logging.INFO) == []  # still over: no summary yet

    clock.advance(132)  # the episode began at the first drop; the link comes back three minutes later
    await outbox.ack("influx", "telemetry", outbox.last_seq("telemetry"))
    await outbox.compact()
    dropped = outbox.stats.dropped_samples
    assert dropped > 0
    (summary,) = outbox_records(caplog, logging.INFO)
    lasted = (clock.now_ns - first_drop_ns) // 10**9
    assert 170 < lasted < 190
    assert summary == (
        f"telemetry store back under its budget: {dropped} samples ({dropped // 10} batches) dropped over budget "
        f"in {lasted // 60}m{lasted % 60:02d}s"
    )
    assert outbox.stats.pressure_since_ns is None

    for i in range(60, 120):  # the next outage is a new episode: one more warning, and only one
        await outbox.append(batch(i * 10))
    assert len(outbox_records(caplog, logging.WARNING)) == 2
    await outbox.close()
    assert outbox_records(caplog, logging.INFO)[-1].startswith("telemetry store still over its budget at close: ")


async def test_delivered_rows_removed_by_the_budget_are_compacted_not_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(tmp_path / "o.db", telemetry_budget=4_000)
    await outbox.register_cursor("influx", "telemetry")
    await outbox.register_cursor("platform", "telemetry")
    for i in range(10):
        await outbox.append(batch(i * 10))
    await outbox.ack("influx", "telemetry", 8)
    await outbox.ack("platform", "telemetry", 6)  # both have delivered 1..6; influx also 7..8
    for i in range(10, 30):
        await outbox.append(batch(i * 10))  # no compaction ran: the budget removes the delivered rows first
    stats = outbox.stats
    removed = 300 - stats.telemetry_samples
    assert removed > 80
    assert stats.compacted_samples == 60 and stats.compacted_batches == 6
    assert stats.dropped_samples == removed - 60 and stats.dropped_batches == (removed - 60) // 10
    assert stats.dropped_by_cursor == {"platform": removed - 60, "influx": removed - 80}

    await outbox.ack("influx", "telemetry", 30)
    await outbox.ack("platform", "telemetry", 30)
    await outbox.compact()  # ordinary compaction counts as compacted too
    assert stats.telemetry_samples == 0
    assert stats.compacted_samples == 300 - stats.dropped_samples
    caplog.clear()
    for i in range(30, 60):  # over budget again, but each uplink delivers as it goes: nothing is lost
        await outbox.append(batch(i * 10))
        await outbox.ack("influx", "telemetry", outbox.last_seq("telemetry"))
        await outbox.ack("platform", "telemetry", outbox.last_seq("telemetry"))
    assert stats.dropped_samples == removed - 60
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    await outbox.close()

    reopened = Outbox(tmp_path / "o.db", telemetry_budget=4_000)  # the counters are on disk
    assert reopened.stats.compacted_samples == stats.compacted_samples
    assert reopened.stats.dropped_samples == stats.dropped_samples
    await reopened.close()


async def test_the_files_on_disk_stay_within_the_budget_plus_the_margin_with_a_stalled_uplink(tmp_path: Path) -> None:
    budget = 44 * 1024
    outbox = Outbox(tmp_path / "o.db", telemetry_budget=budget, event_budget=4 * 1024)
    await outbox.register_cursor("influx", "telemetry")  # never acks: everything stays until the budget drops it
    assert outbox.wal_limit == 64 * 1024 and outbox.disk_margin == 64 * 1024 + 160 * 1024 + (budget + 4 * 1024) // 8
    peak = 0
    for i in range(800):
        await outbox.append(batch(i * 10, 10 if i % 50 else 200))  # now and then a larger poll
        usage = outbox.disk_usage()
        files = {name: (tmp_path / name).stat().st_size for name in ("o.db", "o.db-wal", "o.db-shm")}
        assert sorted(usage.values()) == sorted(files.values())  # measured from the files themselves
        assert usage["wal"] < outbox.wal_limit  # checkpointed and truncated once it reached its limit
        peak = max(peak, sum(usage.values()))
    assert outbox.stats.dropped_samples > 0 and outbox.stats.telemetry_bytes <= budget
    assert peak <= budget + outbox.disk_margin, (peak, budget + outbox.disk_margin)  # no events: their budget unused
    await outbox.close()


async def test_small_events_count_their_rows_so_a_full_event_store_stays_within_its_budget_on_disk(
    tmp_path: Path,
) -> None:
    budget = 64 * 1024
    outbox = Outbox(tmp_path / "o.db", telemetry_budget=44 * 1024, event_budget=budget)
    i = 0
    while not outbox.stats.event_store_full:
        await outbox.append_events(
            [Event(f"rule-high-co2@{T0 + i + k}/then0", "alarm", "zone1", T0, {"v": k}) for k in range(20)]
        )
        await outbox.append(batch(i))
        i += 20
    usage = outbox.disk_usage()
    assert sum(usage.values()) <= outbox.telemetry_budget + budget + outbox.disk_margin, usage
    await outbox.close()
