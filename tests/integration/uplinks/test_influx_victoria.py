"""InfluxUplink against a real VictoriaMetrics speaking the InfluxDB v2 write API: exact values, an outage with
ordered replay, a point the TSDB rejects, and the telemetry budget running out while the TSDB is down."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gateway.model import Event, Quality, Sample
from gateway.outbox import Outbox
from tests.integration.uplinks.common import FAST_DELIVERY, load, readings, runners, wait_for
from tests.services import VictoriaMetrics

pytestmark = pytest.mark.integration


def influx_site(tmp_path: Path, tsdb: VictoriaMetrics, *, bucket: str) -> Any:
    token = tmp_path / "influx.token"
    token.write_text("not-checked-by-victoria\n")
    return load(
        tmp_path,
        f"  influx: {{url: '{tsdb.url}', org: acme, bucket: {bucket}, token_file: influx.token,"
        f" extra_tags: {{test: {bucket}}}, delivery: {FAST_DELIVERY}}}\n",
    )


def series(tsdb: VictoriaMetrics, test: str, name: str, **labels: str) -> list[tuple[int, float]]:
    """(ms, value) pairs of one series of one test, in time order; duplicates (a resend) are kept, to be checked."""
    labels["test"] = test
    selector = ",".join([f'__name__="{name}"', *(f'{k}="{v}"' for k, v in labels.items())])
    rows = tsdb.export("{" + selector + "}")
    pairs = [(int(t), float(v)) for row in rows for t, v in zip(row["timestamps"], row["values"], strict=True)]  # type: ignore[call-overload]
    return sorted(pairs)


def distinct(pairs: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Drop exact duplicates; a resend must repeat the same timestamp with the same value."""
    by_ts: dict[int, float] = {}
    for ts, value in pairs:
        assert by_ts.setdefault(ts, value) == value, f"two different values at {ts}"
    return sorted(by_ts.items())


async def run_until_delivered(outbox: Outbox, runner: Any, *, timeout: float = 20.0) -> None:
    stopping = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(runner.run(stopping))
        await wait_for(
            lambda: runner.status()["backlog_samples"] == 0 and runner.counters.sent_samples > 0, timeout, "delivery"
        )
        stopping.set()


async def test_values_are_written_and_read_back_exactly(tmp_path: Path, tsdb: VictoriaMetrics) -> None:
    site = influx_site(tmp_path, tsdb, bucket="exact")
    outbox = Outbox(tmp_path / "outbox.db")
    t0 = 1_790_000_000_000
    samples = readings(0, 50, t0_ms=t0)
    samples.append(Sample("m2.voltage", 231.25, t0 * 1_000_000, Quality.UNCERTAIN))
    samples.append(Sample("m2.current", None, t0 * 1_000_000, Quality.BAD))  # no value: never written
    await outbox.append(samples)
    (runner,) = runners(site, outbox)
    await run_until_delivered(outbox, runner)
    await outbox.close()

    power = series(tsdb, "exact", "energy_meter_power_kw", device="m1", site="tower", gateway="gw1")
    assert distinct(power) == [(t0 + i, round(1.5 + i * 0.25, 3)) for i in range(50)]
    assert distinct(series(tsdb, "exact", "energy_meter_energy_kwh", device="m1")) == [
        (t0 + i, 1000.0 + i) for i in range(50)
    ]
    assert series(tsdb, "exact", "energy_meter_voltage", device="m2", floor="2") == [(t0, 231.25)]
    assert series(tsdb, "exact", "energy_meter_current", device="m2") == []
    assert runner.status()["quarantined"] == 0


async def test_tsdb_outage_then_everything_arrives_in_order_with_the_backlog_replayed(
    tmp_path: Path, tsdb: VictoriaMetrics
) -> None:
    site = influx_site(tmp_path, tsdb, bucket="outage")
    outbox = Outbox(tmp_path / "outbox.db")
    (runner,) = runners(site, outbox)
    t0 = 1_790_100_000_000
    stopping = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(runner.run(stopping))
        await outbox.append(readings(0, 100, t0_ms=t0))
        await wait_for(lambda: runner.counters.sent_samples >= 200, what="first batch")
        tsdb.stop()
        for chunk in range(10):  # a poll every 50 ms while the TSDB is down
            await outbox.append(readings(100 + chunk * 20, 20, t0_ms=t0))
            await asyncio.sleep(0.05)
        await wait_for(lambda: runner.status()["state"] == "retrying", what="retrying")
        down = runner.status()
        assert down["backlog_samples"] == 400
        assert down["last_error"] and "unreachable" in down["last_error"]
        await asyncio.sleep(0.6)  # older than the live window: this is backfill now
        tsdb.start()
        await outbox.append(readings(300, 10, t0_ms=t0))  # live data after the outage
        await wait_for(
            lambda: runner.status()["backlog_samples"] == 0 and not runner.status()["replaying"], what="replay"
        )
        stopping.set()
    status = runner.status()
    assert status["replayed_samples"] >= 400
    assert status["requests_failed"] >= 1
    await outbox.close()
    power = series(tsdb, "outage", "energy_meter_power_kw", device="m1")
    assert distinct(power) == [(t0 + i, round(1.5 + i * 0.25, 3)) for i in range(310)]


async def test_a_point_the_tsdb_rejects_does_not_hold_back_the_rest_of_its_batch(
    tmp_path: Path, tsdb: VictoriaMetrics
) -> None:
    site = influx_site(tmp_path, tsdb, bucket="malformed")
    outbox = Outbox(tmp_path / "outbox.db")
    t0 = 1_790_200_000_000
    batch = readings(0, 20, t0_ms=t0)
    # A device clock gone wild: a timestamp past int64 nanoseconds, a line no TSDB can parse.
    batch.insert(7, Sample("m1.voltage", 230.0, 2**63 + 1, Quality.GOOD))
    batch.insert(9, Sample("m1.pf", float("nan"), t0 * 1_000_000, Quality.GOOD))  # never valid in InfluxDB
    await outbox.append(batch)
    (runner,) = runners(site, outbox)
    await run_until_delivered(outbox, runner)
    await outbox.close()
    assert distinct(series(tsdb, "malformed", "energy_meter_power_kw", device="m1")) == [
        (t0 + i, round(1.5 + i * 0.25, 3)) for i in range(20)
    ]
    assert series(tsdb, "malformed", "energy_meter_voltage", device="m1") == []
    assert series(tsdb, "malformed", "energy_meter_pf", device="m1") == []
    encoder = runner.uplink.encoder  # type: ignore[attr-defined]
    assert encoder.skipped_non_finite + encoder.skipped_bad == 1  # NaN is stored as null: no value to write


async def test_budget_exceeded_during_an_outage_drops_oldest_counts_them_and_keeps_every_event(
    tmp_path: Path, tsdb: VictoriaMetrics
) -> None:
    site = influx_site(tmp_path, tsdb, bucket="budget")
    outbox = Outbox(tmp_path / "outbox.db", telemetry_budget=20_000, event_budget=1_000_000)
    t0 = 1_790_300_000_000
    (runner,) = runners(site, outbox)
    await outbox.register_cursor("influx", "telemetry")  # the uplink exists, but the TSDB is down
    events = [Event(f"inc-{i}", "incentive", f"acct-{i}", t0 * 1_000_000, {"kwh": i}) for i in range(5)]
    await outbox.append_events(events)
    for chunk in range(40):
        await outbox.append(readings(chunk * 10, 10, t0_ms=t0))
    dropped = outbox.stats.dropped_samples
    kept = outbox.stats.telemetry_samples
    assert dropped > 0
    assert dropped + kept == 800
    assert outbox.stats.event_count == 5
    await run_until_delivered(outbox, runner)
    assert runner.status()["dropped_samples"] == dropped
    assert [e.event.id for e in outbox.read_events(0)] == [e.id for e in events]  # not touched by the drop
    await outbox.close()
    first_kept = dropped // 2  # two samples per read: the oldest reads went first
    power = distinct(series(tsdb, "budget", "energy_meter_power_kw", device="m1"))
    assert power == [(t0 + i, round(1.5 + i * 0.25, 3)) for i in range(first_kept, 400)]
