"""The ledger stage: readings in, signed schema-2 records out; the auditor's faults, DST days, keys, epochs."""

from __future__ import annotations

import random
import secrets
import sqlite3
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.errors import ConfigError, StoreError
from gateway.incentives.config import validate_against
from gateway.incentives.record import record_hash
from gateway.incentives.stage import IncentiveStage, ProgrammeChanged
from gateway.model import Event, Quality, Sample
from tests.unit.incentives.helpers import DEFAULT_INCENTIVES, MIN, NS, T0, intervals, make_site, reading

A1, A2 = "apt1.energy_kwh", "apt2.energy_kwh"


@pytest.fixture
def stage(tmp_path: Path) -> Iterator[IncentiveStage]:
    opened = IncentiveStage.open(make_site(tmp_path), tmp_path / "data")
    yield opened
    opened.close()


def records(events: list[Event], account: str | None = None) -> list[dict[str, Any]]:
    return [r for r in intervals(events) if account is None or r["account"] == account]


def feed_minutes(
    stage: IncentiveStage, point: str, minutes: range, kwh_per_min: float, base: float = 100.0
) -> list[Event]:
    events: list[Event] = []
    for minute in minutes:
        ts = T0 + minute * MIN
        events += stage.process([reading(point, ts, round(base + minute * kwh_per_min, 6))], ts)
    return events


def test_complete_intervals_are_issued_with_saving_and_carbon(stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(32), 0.02)  # 0.3 kWh per 15 min against a 0.5 kWh baseline
    issued = records(events)
    assert [r["interval"]["start"] for r in issued] == ["2026-11-02T00:00:00Z", "2026-11-02T00:15:00Z"]
    first = issued[0]
    assert (first["energy_kwh"], first["delta_kwh"], first["saving_kwh"]) == ("0.300000", "0.200000", "0.200000")
    assert (first["status"], first["flags"]) == ("measured", [])
    assert first["co2e_kg"] == "0.171090"  # 0.3 x 0.5703
    assert first["co2e_saved_kg"] == "0.114060"
    assert first["meters"][0]["readings"][0] == {"ts": "2026-11-02T00:00:00Z", "kwh": "100.000000"}
    assert [r["seq"] for r in issued] == [2, 3]  # seq 1 is the genesis record
    genesis = intervals_and_epochs(events)[0]
    assert (genesis["kind"], genesis["seq"], genesis["epoch"]) == ("epoch", 1, 1)
    assert first["programme"] == genesis["programme"]
    event = next(e for e in events if e.id == first["id"])
    assert event.type == "incentive" and event.subject == first["account"] and event.ts == T0 + 15 * MIN


def test_missing_readings_close_incomplete_after_max_delay_and_never_save(stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(10), 0.001)  # the meter stops at minute 9: the end edge is never read
    assert records(stage.tick(T0 + 15 * MIN + 29 * MIN)) == []  # still waiting for a late reading
    issued = records(stage.tick(T0 + 45 * MIN), None)
    assert records(events) == []
    first = issued[0]
    assert (first["flags"], first["status"], first["saving_kwh"]) == (["gap"], "incomplete", "0.000000")
    assert all(r["saving_kwh"] == "0.000000" for r in issued)


def test_backfilled_readings_arriving_late_and_out_of_order_complete_the_interval(stage: IncentiveStage) -> None:
    minutes = list(range(20))
    random.Random(7).shuffle(minutes)
    now = T0 + 20 * MIN
    events = stage.process([reading(A1, T0 + 20 * MIN, 100.8)], now)  # live value first: the link came back
    # then the meter's logger is read back in one batch, out of order
    events += stage.process([reading(A1, T0 + minute * MIN, 100 + minute * 0.04) for minute in minutes], now)
    first = records(events)[0]
    assert first["status"] == "measured"
    assert first["energy_kwh"] == "0.600000"


def test_duplicate_and_late_readings_change_nothing_and_are_counted(stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(16), 0.03)
    now = T0 + 16 * MIN + 1
    events += stage.process([reading(A1, T0 + 7 * MIN, 100.21), reading(A1, T0 + 7 * MIN, 999.0)], now)
    events += stage.tick(now)
    assert records(events)[0]["energy_kwh"] == "0.450000"
    assert stage.counters["duplicates"] == 2
    stage.process([reading(A1, T0 + 3 * MIN, 100.09)], now)  # its interval is already issued
    assert stage.counters["late_dropped"] == 1


def test_bad_quality_and_non_numeric_samples_are_ignored(stage: IncentiveStage) -> None:
    stage.process([Sample(A1, None, T0, Quality.BAD), Sample(A1, "x", T0, Quality.GOOD), Sample(A1, -1.0, T0)], T0)
    stage.process([Sample("zone1.co2", 400.0, T0)], T0)  # not a meter: ignored without a count
    assert stage.counters["invalid"] == 2 and stage.counters["not_good"] == 1


def test_meter_reset_mints_no_saving(stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(8), 0.01)
    events += feed_minutes(stage, A1, range(8, 16), 0.01, base=-0.08)  # reset to 0 at minute 8
    events += stage.tick(T0 + 17 * MIN)
    first = records(events)[0]
    assert first["status"] == "flagged" and first["flags"] == ["reset"]
    assert first["saving_kwh"] == "0.000000"


def _day_of_readings(stage: IncentiveStage, day_start_ns: int, hours: int) -> list[Event]:
    events: list[Event] = []
    for step in range(hours * 4 + 1):
        ts = day_start_ns + step * 15 * MIN
        events += stage.process([reading(A1, ts, 100 + step * 0.1), reading(A2, ts, 300 + step * 0.2)], ts)
    return events + stage.tick(day_start_ns + (hours * 4 + 1) * 15 * MIN)


@pytest.mark.parametrize(
    ("zone", "day", "day_start_utc", "hours", "offsets"),
    [
        ("Asia/Shanghai", "2026-11-03", 1_793_635_200 * NS, 24, {"+08:00"}),  # DST-free zone
        ("Europe/Berlin", "2026-03-29", 1_774_738_800 * NS, 23, {"+01:00", "+02:00"}),  # spring forward
        ("Europe/Berlin", "2026-10-25", 1_792_879_200 * NS, 25, {"+01:00", "+02:00"}),  # fall back
    ],
)
def test_intervals_across_a_day_in_dst_and_dst_free_zones(
    tmp_path: Path, zone: str, day: str, day_start_utc: int, hours: int, offsets: set[str]
) -> None:
    quarter_hourly = DEFAULT_INCENTIVES.replace("max_gap: 5min", "max_gap: 15min")  # read at every edge only
    stage = IncentiveStage.open(make_site(tmp_path, quarter_hourly, timezone=zone), tmp_path / "data")
    try:
        _day_of_readings(stage, day_start_utc, hours)
        of_day = [
            r
            for r in stage.records_of_day(date.fromisoformat(day))
            if r["kind"] == "interval" and r["meters"][0]["kwh"] == "0.100000"
        ]
    finally:
        stage.close()
    assert len(of_day) == hours * 4  # 92 on the spring day, 100 on the autumn day, every one 15 real minutes
    assert all(r["status"] == "measured" and r["energy_kwh"] == "0.100000" for r in of_day)
    assert {r["interval"]["local_start"][-6:] for r in of_day} == offsets
    assert of_day[0]["interval"]["local_start"].startswith(f"{day}T00:00:00")


def test_time_of_day_emission_factor_applies_by_local_start(tmp_path: Path) -> None:
    incentives = DEFAULT_INCENTIVES.replace(
        "emission_factor: {kg_per_kwh: 0.5703}",
        'emission_factor: {kg_per_kwh: 0.5, by_time_of_day: [{from: "22:00", to: "06:00", kg_per_kwh: 0.7}]}',
    )
    stage = IncentiveStage.open(make_site(tmp_path, incentives, timezone="Asia/Shanghai"), tmp_path / "data")
    try:
        # 2026-11-01T21:45Z is 05:45 in Shanghai (night factor); 22:00Z is 06:00 (day factor)
        start = T0 - 2 * 60 * MIN - 15 * MIN
        events: list[Event] = []
        for minute in range(32):
            ts = start + minute * MIN
            events += stage.process([reading(A1, ts, 10 + minute * 0.01)], ts)
    finally:
        stage.close()
    factors = [r["emission_factor_kg_per_kwh"] for r in records(events)]
    assert factors == ["0.7", "0.5"]


def test_records_keep_real_ids_and_point_names_on_the_gateway(stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(17), 0.02)
    text = orjson.dumps([e.body for e in events]).decode()
    assert "ACC-0001" not in text and "apt1" not in text
    assert records(events)[0]["account"].startswith("acct_")


# -- config, keys and the ledger --------------------------------------------------------------------------------


def test_unknown_meter_point_is_a_positioned_error(tmp_path: Path) -> None:
    site = make_site(tmp_path, DEFAULT_INCENTIVES.replace("apt2.energy_kwh", "apt9.energy_kwh"))
    problems = validate_against(site)
    assert [p.format().splitlines()[0].split(":", 1)[1] for p in problems] == [
        "21:33: meter point 'apt9.energy_kwh' is not a point of any device"
    ]
    with pytest.raises(ConfigError, match="apt9"):
        IncentiveStage.open(site, tmp_path / "data")


def test_non_counter_point_is_refused(tmp_path: Path) -> None:
    site = make_site(tmp_path, DEFAULT_INCENTIVES.replace("apt2.energy_kwh", "apt2.power_kw"))
    assert "is in kW, expected cumulative kWh" in validate_against(site)[0].message


def test_missing_keys_without_generation_are_config_errors(tmp_path: Path) -> None:
    site = make_site(
        tmp_path, DEFAULT_INCENTIVES.replace("generate_missing_keys: true", "generate_missing_keys: false")
    )
    with pytest.raises(ConfigError, match="cannot read signing key") as info:
        IncentiveStage.open(site, tmp_path / "data")
    assert info.value.diagnostics[0].line == 16  # the signing_key_file line


def test_generated_keys_are_private_and_not_regenerated_once_records_exist(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    stage = IncentiveStage.open(site, tmp_path / "data")
    assert records(feed_minutes(stage, A1, range(17), 0.02))
    stage.close()
    keys = tmp_path / "data" / "keys"
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in keys.iterdir()} == {
        "signing.pem": "0o600",
        "signing.pub.pem": "0o600",
        "pseudonym.key": "0o600",
    }
    (keys / "pseudonym.key").unlink()
    with pytest.raises(ConfigError, match="ledger already holds records"):
        IncentiveStage.open(site, tmp_path / "data")


def test_a_changed_pseudonym_key_is_a_programme_change_that_needs_a_new_epoch(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    IncentiveStage.open(site, tmp_path / "data").close()
    other = tmp_path / "data" / "keys" / "pseudonym.key"
    other.write_text(secrets.token_hex(32) + "\n")  # a valid key (random, 0600), just not the ledger's
    other.chmod(0o600)
    with pytest.raises(ProgrammeChanged, match="the pseudonym key"):
        IncentiveStage.open(site, tmp_path / "data")


def test_a_wrong_kind_of_signing_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    keys = tmp_path / "data" / "keys"
    keys.mkdir(parents=True)
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (keys / "signing.pem").write_bytes(pem)
    with pytest.raises(ConfigError, match="not an Ed25519 private key"):
        IncentiveStage.open(make_site(tmp_path), tmp_path / "data")


def test_reopening_replays_recent_records_with_the_same_bytes(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    stage = IncentiveStage.open(site, tmp_path / "data")
    first = feed_minutes(stage, A1, range(17), 0.02)
    assert [e.body.get("kind", "checkpoint") for e in first] == ["epoch", "checkpoint", "interval", "checkpoint"]
    stage.close()
    again = IncentiveStage.open(site, tmp_path / "data")
    try:
        replayed = again.tick(T0 + 16 * MIN + 30 * NS)
        # the records again, and the newest checkpoint
        expected = [e.body for e in first if e.type == "incentive"] + [first[-1].body]
        assert [e.body for e in replayed] == expected
        assert again.tick(T0 + 16 * MIN + 40 * NS) == []  # only once per open
        more = feed_minutes(again, A1, range(17, 32), 0.02)
    finally:
        again.close()
    assert [r["seq"] for r in records(more)] == [3]
    assert records(more)[0]["prev_hash"] == record_hash(records(first)[0])


def test_unwritable_data_dir_is_a_store_error(tmp_path: Path) -> None:
    from gateway.errors import StoreError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError):
        IncentiveStage.open(make_site(tmp_path), blocker / "data")


def test_a_long_outage_backlog_is_issued_in_bounded_steps_in_order(stage: IncentiveStage) -> None:
    issued = [e for e in stage.process([reading(A1, T0, 100.0)], T0) if e.type == "incentive"]  # genesis
    three_days_later = T0 + 3 * 86_400 * NS
    calls = 0
    while batch := [e for e in stage.tick(three_days_later) if e.type == "incentive"]:
        assert len(batch) <= 200
        issued += batch
        calls += 1
    assert calls > 1
    starts = [e.body["interval"]["start"] for e in issued if e.body["kind"] == "interval"]
    assert len(starts) == len(set(starts)) == 3 * 96 - 2  # all but the last two: still within max_delay
    assert [e.body["seq"] for e in issued] == list(range(1, len(issued) + 1))


def test_an_account_starts_at_the_first_edge_its_first_reading_can_cover(stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(5, 32), 0.02)  # first reading 5 min into an interval
    assert [r["interval"]["start"] for r in records(events)] == ["2026-11-02T00:15:00Z"]
    assert records(events)[0]["status"] == "measured"


def test_a_record_committed_before_a_failure_is_handed_out_by_the_next_call(tmp_path: Path) -> None:
    """The ledger commits record by record; a failure on the k-th must not lose records 1..k-1 (found in review)."""
    stage = IncentiveStage.open(make_site(tmp_path), tmp_path / "data")
    emitted = []
    try:

        def minute(m: int) -> list[Sample]:
            return [
                reading("apt1.energy_kwh", T0 + m * MIN, 100 + m * 0.01),
                reading("apt2.energy_kwh", T0 + m * MIN, 200 + m * 0.01),
            ]

        for m in range(17):
            emitted += stage.process(minute(m), T0 + m * MIN)
        db = stage._ledger._db
        db.execute(  # the second account's record insert fails like an I/O error would
            "CREATE TEMP TRIGGER boom BEFORE INSERT ON records WHEN NEW.account = 'ACC-0002' "
            "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
        )
        with pytest.raises(StoreError):
            stage.process([s for m in range(17, 32) for s in minute(m)], T0 + 31 * MIN)
        db.execute("DROP TRIGGER boom")
        for m in range(32, 50):
            emitted += stage.process(minute(m), T0 + m * MIN)
        ledger = [row[0] for row in db.execute("SELECT seq FROM records ORDER BY seq")]
    finally:
        stage.close()
    assert sorted(e.body["seq"] for e in emitted if e.type == "incentive") == ledger


def intervals_and_epochs(events: list[Event]) -> list[dict[str, Any]]:
    return [e.body for e in events if e.type == "incentive"]


# -- the auditor's faults (issue 11), each against the rule that now stops it -------------------------------------

LIKE_DAYS = DEFAULT_INCENTIVES.replace(
    "baseline: {method: fixed, kwh: 0.5}", "baseline: {method: like_days, days: 3, min_days: 2}"
)


def _steady(stage: IncentiveStage, start_ns: int, minutes: int, kw: float, base: float, step_s: int = 60) -> float:
    """Readings every ``step_s`` at a steady ``kw``; returns the last counter value."""
    value = base
    for index in range(minutes * 60 // step_s + 1):
        ts = start_ns + index * step_s * NS
        value = round(base + kw * index * step_s / 3600, 6)
        stage.process([reading(A1, ts, value)], ts)
    return value


@pytest.mark.parametrize("jitter_s", [10, 30])
def test_poll_jitter_pays_nothing_to_a_household_at_its_baseline(tmp_path: Path, jitter_s: int) -> None:
    """The old nearest-reading edges paid 0.4 % (±10 s) to 1.1 % (±30 s) of baseline; interpolation pays rounding."""
    stage = IncentiveStage.open(make_site(tmp_path), tmp_path / "data")  # baseline 0.5 kWh per 15 min = 2 kW
    rng = random.Random(jitter_s)
    events: list[Event] = []
    try:
        for minute in range(6 * 60):
            ts = T0 + minute * MIN + rng.randint(-jitter_s, jitter_s) * NS
            value = round(100 + 2.0 * (ts - T0) / (3600 * NS), 6)  # exactly 2 kW, read at jittered times
            events += stage.process([reading(A1, ts, value)], ts)
    finally:
        stage.close()
    issued = [r for r in records(events) if r["status"] == "measured"]
    assert len(issued) >= 22
    paid = sum(int(r["saving_kwh"].replace(".", "")) for r in issued)  # micro-kWh
    assert paid <= 2 * len(issued)  # at most the floor rounding at two edges, 2 µkWh an interval


def test_daily_netting_pays_only_what_holds_over_the_day(tmp_path: Path) -> None:
    site = make_site(tmp_path, DEFAULT_INCENTIVES.replace("netting: interval", "netting: day"))
    stage = IncentiveStage.open(site, tmp_path / "data")
    events: list[Event] = []
    try:
        value = 100.0
        for quarter in range(96 + 2):  # one day: alternate 0.3 and 0.8 kWh against 0.5 (net +0.2 every two)
            ts = T0 + quarter * 15 * MIN
            for step in range(15):
                events += stage.process([reading(A1, ts + step * MIN, round(value, 6))], ts + step * MIN)
                value += (0.3 if quarter % 2 == 0 else 0.8) / 15
    finally:
        stage.close()
    settled = [e.body for e in events if e.type == "incentive" and e.body["kind"] == "settlement"]
    assert len(settled) == 1
    day = settled[0]
    assert day["day"] == "2026-11-02" and len(day["intervals"]) == 96
    assert all(r["saving_kwh"] == "0.000000" for r in records(events))  # intervals carry deltas only
    assert day["net_kwh"] == "-4.800000" and day["saving_kwh"] == "0.000000"  # 48 x (+0.2) + 48 x (-0.3) < 0


def test_a_bad_zero_at_an_edge_is_measured_right_pays_nothing_and_stays_out_of_baselines(tmp_path: Path) -> None:
    incentives = LIKE_DAYS.replace("min_days: 2", "min_days: 1").replace("max_gap: 5min", "max_gap: 15min")
    stage = IncentiveStage.open(make_site(tmp_path, incentives), tmp_path / "data")
    events: list[Event] = []
    try:
        for step in range(3 * 288 + 4):  # three days (Mon-Wed) read every 5 minutes at 1.2 kW
            ts = T0 + step * 5 * MIN
            value = 100.0 + step * 0.1
            if step == 3:
                value = 0.0  # one bad reading at the 00:15 edge, which under the old rules minted 1,020 kWh
            events += stage.process([reading(A1, ts, round(value, 6))], ts)
    finally:
        stage.close()
    first, tuesday, wednesday = (r for r in records(events) if r["interval"]["start"].endswith("T00:00:00Z"))
    assert first["flags"] == ["spike"] and first["energy_kwh"] == "0.300000"  # the true 0.3 kWh
    assert first["meters"][0]["outliers"] == [{"ts": "2026-11-02T00:15:00Z", "kwh": "0.000000"}]
    assert first["saving_kwh"] == "0.000000"
    assert tuesday["status"] == "no_baseline"  # Monday had a flagged interval: an abnormal day, never a like day
    assert wednesday["baseline"]["days"] == [{"start": "2026-11-03T00:00:00Z", "kwh": "0.300000"}]
    assert wednesday["status"] == "measured" and wednesday["saving_kwh"] == "0.000000"


def test_a_frozen_meter_pays_nothing(stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(10), 0.02)
    events += feed_minutes(stage, A1, range(10, 50), 0.0, base=100.18)  # frozen at minute 9's value
    stuck = [r for r in records(events) if "stuck" in r["flags"]]
    assert stuck and all(r["saving_kwh"] == "0.000000" for r in records(events) if r["flags"])
    assert all(r["saving_kwh"] == "0.000000" for r in stuck)


def test_a_float32_counter_too_coarse_for_the_interval_is_flagged(stage: IncentiveStage) -> None:
    base = float(2**24)  # a float32 register at 16,777,216 kWh counts in steps of 2 kWh
    events = feed_minutes(stage, A1, range(32), 0.0, base=base)
    assert {f for r in records(events) for f in r["flags"]} >= {"resolution"}
    assert all(r["saving_kwh"] == "0.000000" for r in records(events))


def test_a_clock_step_back_flags_the_intervals_it_touches_and_pays_nothing_there(stage: IncentiveStage) -> None:
    events: list[Event] = []
    for minute in range(40):
        ts = T0 + minute * MIN
        events += stage.process([reading(A1, ts, round(100 + minute * 0.02, 6))], ts)
    # the gateway clock steps back 30 minutes; the meter keeps counting at the same rate
    for minute in range(40, 120):
        ts = T0 + (minute - 30) * MIN
        events += stage.process([reading(A1, ts, round(100 + minute * 0.02, 6))], ts)
    issued = records(events)
    touched = [r for r in issued if "clock" in r["flags"]]
    assert touched, "the step went unnoticed"
    assert stage.counters["clock_steps"] == 1
    for record in issued:  # nothing paid for more than the real consumption (0.3 kWh per 15 min)
        assert record["saving_kwh"] in ("0.000000", "0.200000"), record["interval"]
        assert int(record["energy_kwh"].replace(".", "")) <= 300_000 + 2 or record["flags"]


def test_a_reading_stamped_a_day_ahead_is_refused_and_closes_nothing(stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(10), 0.02)
    now = T0 + 10 * MIN
    events += stage.process([reading(A1, now + 86_400 * NS, 150.0)], now)
    events += feed_minutes(stage, A1, range(10, 32), 0.02)
    assert stage.counters["future"] == 1
    assert [r["status"] for r in records(events)] == ["measured", "measured"]


def test_an_absurd_value_is_refused_alone_and_other_accounts_keep_their_reading(stage: IncentiveStage) -> None:
    stage.process([reading(A1, T0, 1e13), reading(A2, T0, 50.0)], T0)
    assert stage.counters["invalid"] == 1
    events = feed_minutes(stage, A2, range(1, 17), 0.02, base=50.0)
    assert records(events)[0]["energy_kwh"] == "0.300000"


def test_changing_the_interval_is_refused_until_a_new_epoch_is_started(tmp_path: Path) -> None:
    hourly = make_site(tmp_path, DEFAULT_INCENTIVES.replace("interval: 15min", "interval: 1h"))
    stage = IncentiveStage.open(hourly, tmp_path / "data")
    events = feed_minutes(stage, A1, range(70), 0.02)
    stage.close()
    quarter = make_site(tmp_path, DEFAULT_INCENTIVES)
    with pytest.raises(ProgrammeChanged, match="interval_s 3600 -> 900"):
        IncentiveStage.open(quarter, tmp_path / "data")
    stage = IncentiveStage.open(quarter, tmp_path / "data", new_epoch_reason="tariff change")
    try:
        started = [e.body for e in stage.start_epoch(T0 + 70 * MIN) if e.type == "incentive"]
        events += feed_minutes(stage, A1, range(70, 130), 0.02)
    finally:
        stage.close()
    assert [(r["kind"], r["epoch"], r["reason"]) for r in started] == [("epoch", 2, "tariff change")]
    assert started[0]["previous_programme"] == records(events)[0]["programme"]
    later = [r for r in records(events) if r["epoch"] == 2]
    assert later and all(r["interval"]["start"][14:16] in ("00", "15", "30", "45") for r in later)
    assert later[0]["interval"]["start"] == "2026-11-02T01:00:00Z"  # where the hourly records ended
    assert IncentiveStage.open(quarter, tmp_path / "data").epoch == 2


def test_a_meter_without_a_power_limit_is_a_config_error(tmp_path: Path) -> None:
    site = make_site(tmp_path, DEFAULT_INCENTIVES.replace("max_power_kw: 40\n", ""))
    problems = validate_against(site)
    assert len(problems) == 2 and "has no power limit" in problems[0].message


def test_the_ledger_is_private_and_an_old_ledger_is_refused_clearly(tmp_path: Path) -> None:
    stage = IncentiveStage.open(make_site(tmp_path), tmp_path / "data")
    stage.close()
    assert oct((tmp_path / "data" / "incentives.db").stat().st_mode & 0o777) == "0o600"
    old = tmp_path / "old"
    old.mkdir()
    with sqlite3.connect(old / "incentives.db") as db:
        db.execute("CREATE TABLE records (seq INTEGER PRIMARY KEY)")
    with pytest.raises(StoreError, match="older gateway"):
        IncentiveStage.open(make_site(tmp_path), old)


def test_records_keep_no_real_ids_even_in_the_programme(stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(17), 0.02)
    text = orjson.dumps([e.body for e in events]).decode()
    assert "ACC-0001" not in text and "apt1" not in text


def test_the_platforms_copy_verifies_and_its_retained_checkpoint_shows_a_missing_tail(
    tmp_path: Path, stage: IncentiveStage, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main as cli_main
    from gateway.outbox import StoredEvent
    from gateway.uplinks.contract import RETAINED_EVENT_TYPES, event_message

    events = feed_minutes(stage, A1, range(47), 0.02)
    messages = [(event.type, event_message("p/s/g", StoredEvent(0, 0, event))[1]) for event in events]
    # the newest retained message is what a platform that subscribes late gets
    retained = [payload for kind, payload in messages if kind in RETAINED_EVENT_TYPES][-1]
    records = [payload for kind, payload in messages if kind == "incentive"]
    assert len(records) == 4  # genesis and three intervals
    (tmp_path / "checkpoint.json").write_bytes(retained)
    public = tmp_path / "data" / "keys" / "signing.pub.pem"
    check = ["--public-key", str(public), "--checkpoint", str(tmp_path / "checkpoint.json")]

    (tmp_path / "all.jsonl").write_bytes(b"\n".join(records) + b"\n")
    assert cli_main(["incentives", "verify", str(tmp_path / "all.jsonl"), *check]) == 0
    (tmp_path / "cut.jsonl").write_bytes(b"\n".join(records[:-1]) + b"\n")  # the last record never arrived
    capsys.readouterr()
    assert cli_main(["incentives", "verify", str(tmp_path / "cut.jsonl"), *check]) == 1
    assert "tail missing" in capsys.readouterr().out


def test_a_meter_rated_in_its_device_profile_needs_no_other_limit_and_the_tightest_wins(tmp_path: Path) -> None:
    from gateway.config.site import load_site
    from gateway.incentives.programme import build_programme
    from gateway.incentives.record import Pseudonymizer

    path = tmp_path / "site.yaml"
    path.write_text(
        "version: 1\ngateway: {id: gw1, site: tower}\n"
        "modbus_buses: [{id: b1, type: tcp, host: 127.0.0.1}]\n"
        "devices:\n"
        "  - {id: m1, driver: modbus, profile: eastron-sdm120, bus: b1, unit: 1}\n"
        "  - {id: m2, driver: modbus, profile: eastron-sdm120, bus: b1, unit: 2}\n"
        "incentives:\n  baseline: {method: fixed, kwh: 0.5}\n  emission_factor: {kg_per_kwh: 0.5}\n"
        "  signing_key_file: k.pem\n  pseudonym_key_file: p.key\n  accounts:\n"
        "    - {id: A1, meters: [m1.import_kwh]}\n"
        "    - {id: A2, meters: [m2.import_kwh], max_power_kw: 7.2}\n"
    )
    site = load_site(path)
    assert validate_against(site) == []  # the SDM120 profile rates its energy points (45 A x 230 V)
    assert site.config.incentives is not None
    programme = build_programme(site.config.incentives, site.registry, Pseudonymizer(b"0123456789abcdef" * 4), "UTC")
    limits = [plan.rules[plan.meters[0]].limit_w for plan in programme.accounts]
    assert limits == [10_400, 7_200]


def test_an_interval_closed_overdue_on_equal_readings_pays_nothing(stage: IncentiveStage) -> None:
    """Found by the property test: the meter's data lag the clock, its last readings are equal (a freeze may have
    begun), and the interval is closed at max_delay before anyone can tell: it must not pay the frozen part."""
    events = feed_minutes(stage, A1, range(10), 0.02)
    events += feed_minutes(stage, A1, range(10, 17), 0.0, base=100.18)  # equal readings from 00:09 past the end
    assert records(events) == []  # waiting: the run of equal readings is still undecided
    events += stage.tick(T0 + 15 * MIN + 30 * MIN)  # overdue
    first = records(events)[0]
    assert first["flags"] == ["stuck"] and first["saving_kwh"] == "0.000000"


def test_a_ledger_from_before_run_since_gains_the_column_and_keeps_its_anchors(tmp_path: Path) -> None:
    from gateway.incentives.energy import Anchor, Reading
    from gateway.incentives.ledger import LEDGER_FILE, Ledger

    Ledger.open(tmp_path, durable=False).close()
    db = sqlite3.connect(tmp_path / LEDGER_FILE)
    db.execute("ALTER TABLE anchors DROP COLUMN run_since_ns")  # the version 2 schema of 2026-12-02
    db.execute("INSERT INTO anchors (point, edge_ns, ts_ns, micro_kwh, allocated) VALUES ('m', 900, 850, 5, 1)")
    db.commit()
    db.close()
    ledger = Ledger.open(tmp_path, durable=False)
    try:
        assert ledger.anchors() == {"m": Anchor(900, Reading(850, 5), 1, None)}
    finally:
        ledger.close()
