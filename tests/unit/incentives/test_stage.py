"""The ledger stage: readings in, signed records out; late and duplicate readings, DST days, keys, privacy, schema."""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import orjson
import pytest

from gateway.errors import ConfigError, StoreError
from gateway.incentives.config import validate_against
from gateway.incentives.record import load_public_key, record_hash
from gateway.incentives.stage import IncentiveStage
from gateway.incentives.verify import verify_lines
from gateway.model import Event, Quality, Sample
from tests.unit.incentives.helpers import DEFAULT_INCENTIVES, MIN, NS, T0, make_site, reading

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[3] / "gateway" / "incentives" / "incentive-record.schema.json").read_text()
)
A1, A2 = "apt1.energy_kwh", "apt2.energy_kwh"


@pytest.fixture
def stage(tmp_path: Path) -> Iterator[IncentiveStage]:
    opened = IncentiveStage.open(make_site(tmp_path), tmp_path / "data")
    yield opened
    opened.close()


def records(events: list[Event], account: str | None = None) -> list[dict[str, Any]]:
    return [e.body for e in events if account is None or e.subject == account]


def feed_minutes(
    stage: IncentiveStage, point: str, minutes: range, kwh_per_min: float, base: float = 100.0
) -> list[Event]:
    events: list[Event] = []
    for minute in minutes:
        events += stage.process([reading(point, T0 + minute * MIN, round(base + minute * kwh_per_min, 6))])
    return events


def test_complete_intervals_are_issued_with_saving_and_carbon(stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(32), 0.02)  # 0.3 kWh per 15 min against a 0.5 kWh baseline
    issued = records(events)
    assert [r["interval"]["start"] for r in issued] == ["2026-11-02T00:00:00Z", "2026-11-02T00:15:00Z"]
    first = issued[0]
    assert (first["energy_kwh"], first["saving_kwh"], first["status"]) == ("0.300000", "0.200000", "saving")
    assert first["co2e_kg"] == "0.171090"  # 0.3 x 0.5703
    assert first["co2e_saved_kg"] == "0.114060"
    assert first["meters"][0]["start"] == {"ts": "2026-11-02T00:00:00Z", "kwh": "100.000000"}
    assert [r["seq"] for r in issued] == [1, 2]
    assert events[0].type == "incentive" and events[0].id == first["id"] and events[0].subject == first["account"]
    assert events[0].ts == T0 + 15 * MIN


def test_missing_readings_close_incomplete_after_max_delay_and_never_save(stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(10), 0.001)  # the meter stops at minute 9: the end edge is never read
    assert stage.tick(T0 + 15 * MIN + 29 * MIN) == []  # still waiting for a late reading
    issued = records(stage.tick(T0 + 45 * MIN), None)
    assert events == []
    first = issued[0]
    assert (first["complete"], first["status"], first["saving_kwh"]) == (False, "incomplete", "0.000000")
    assert all(r["saving_kwh"] == "0.000000" for r in issued)


def test_backfilled_readings_arriving_late_and_out_of_order_complete_the_interval(stage: IncentiveStage) -> None:
    minutes = list(range(20))
    random.Random(7).shuffle(minutes)
    events = stage.process([reading(A1, T0 + 20 * MIN, 100.8)])  # live value first: the link came back
    # then the meter's logger is read back in one batch, out of order
    events += stage.process([reading(A1, T0 + minute * MIN, 100 + minute * 0.04) for minute in minutes])
    first = records(events)[0]
    assert first["complete"] is True
    assert first["energy_kwh"] == "0.600000"


def test_duplicate_and_late_readings_change_nothing_and_are_counted(stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(16), 0.03)
    events += stage.process([reading(A1, T0 + 7 * MIN, 100.21), reading(A1, T0 + 7 * MIN, 999.0)])
    events += stage.tick(T0 + 16 * MIN + 1)
    assert records(events)[0]["energy_kwh"] == "0.450000"
    assert stage.counters["duplicates"] == 2
    stage.process([reading(A1, T0 + 3 * MIN, 100.09)])  # its interval is already issued
    assert stage.counters["late_dropped"] == 1


def test_bad_quality_and_non_numeric_samples_are_ignored(stage: IncentiveStage) -> None:
    stage.process([Sample(A1, None, T0, Quality.BAD), Sample(A1, "x", T0, Quality.GOOD), Sample(A1, -1.0, T0)])
    stage.process([Sample("zone1.co2", 400.0, T0)])  # not a meter: ignored without a count
    assert stage.counters == {"late_dropped": 0, "invalid": 2, "not_good": 1, "duplicates": 0}


def test_meter_reset_mints_no_saving(stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(8), 0.01)
    events += feed_minutes(stage, A1, range(8, 16), 0.01, base=-0.08)  # reset to 0 at minute 8
    events += stage.tick(T0 + 17 * MIN)
    first = records(events)[0]
    assert first["status"] == "discontinuity" and first["notes"] == ["reset"]
    assert first["saving_kwh"] == "0.000000"


def _day_of_readings(stage: IncentiveStage, day_start_ns: int, hours: int) -> list[Event]:
    events: list[Event] = []
    for step in range(hours * 4 + 1):
        ts = day_start_ns + step * 15 * MIN
        events += stage.process([reading(A1, ts, 100 + step * 0.1), reading(A2, ts, 300 + step * 0.2)])
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
    stage = IncentiveStage.open(make_site(tmp_path, timezone=zone), tmp_path / "data")
    try:
        _day_of_readings(stage, day_start_utc, hours)
        of_day = [r for r in stage.records_of_day(date.fromisoformat(day)) if r["meters"][0]["kwh"] == "0.100000"]
    finally:
        stage.close()
    assert len(of_day) == hours * 4  # 92 on the spring day, 100 on the autumn day, every one 15 real minutes
    assert all(r["complete"] and r["energy_kwh"] == "0.100000" for r in of_day)
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
            events += stage.process([reading(A1, start + minute * MIN, 10 + minute * 0.01)])
    finally:
        stage.close()
    factors = [r["emission_factor_kg_per_kwh"] for r in records(events)]
    assert factors == ["0.7", "0.5"]


def test_records_keep_real_ids_and_point_names_on_the_gateway(stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(17), 0.02)
    text = orjson.dumps([e.body for e in events]).decode()
    assert "ACC-0001" not in text and "apt1" not in text
    assert records(events)[0]["account"].startswith("acct_")


def test_records_match_the_json_schema_and_verify(tmp_path: Path, stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(16), 0.02) + feed_minutes(stage, A2, range(16), 0.05)
    events += stage.tick(T0 + 2 * 60 * MIN)
    assert len(events) >= 4
    for event in events:
        jsonschema.validate(event.body, SCHEMA)
    public = load_public_key(tmp_path / "data" / "keys" / "signing.pub.pem")
    report = verify_lines([orjson.dumps(e.body) for e in events], [public])
    assert report.problems == [] and report.records == len(events)


# -- config, keys and the ledger --------------------------------------------------------------------------------


def test_unknown_meter_point_is_a_positioned_error(tmp_path: Path) -> None:
    site = make_site(tmp_path, DEFAULT_INCENTIVES.replace("apt2.energy_kwh", "apt9.energy_kwh"))
    problems = validate_against(site)
    assert [p.format().splitlines()[0].split(":", 1)[1] for p in problems] == [
        "18:33: meter point 'apt9.energy_kwh' is not a point of any device"
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
    assert info.value.diagnostics[0].line == 13  # the signing_key_file line


def test_generated_keys_are_private_and_not_regenerated_once_records_exist(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    stage = IncentiveStage.open(site, tmp_path / "data")
    assert feed_minutes(stage, A1, range(17), 0.02)
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


def test_a_changed_pseudonym_key_is_refused(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    IncentiveStage.open(site, tmp_path / "data").close()
    other = tmp_path / "data" / "keys" / "pseudonym.key"
    other.write_text(secrets.token_hex(32) + "\n")  # a valid key (random, 0600), just not the ledger's
    other.chmod(0o600)
    with pytest.raises(ConfigError, match="not the one the ledger was started with"):
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
    assert len(first) == 1
    stage.close()
    again = IncentiveStage.open(site, tmp_path / "data")
    try:
        replayed = again.tick(T0 + 16 * MIN + 30 * NS)
        assert [e.body for e in replayed] == [e.body for e in first]
        assert again.tick(T0 + 16 * MIN + 40 * NS) == []  # only once per open
        more = feed_minutes(again, A1, range(17, 32), 0.02)
    finally:
        again.close()
    assert [r["seq"] for r in records(more)] == [2]
    assert records(more)[0]["prev_hash"] == record_hash(records(first)[0])


def test_unwritable_data_dir_is_a_store_error(tmp_path: Path) -> None:
    from gateway.errors import StoreError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError):
        IncentiveStage.open(make_site(tmp_path), blocker / "data")


def test_a_long_outage_backlog_is_issued_in_bounded_steps_in_order(stage: IncentiveStage) -> None:
    stage.process([reading(A1, T0, 100.0)])
    three_days_later = T0 + 3 * 86_400 * NS
    issued: list[Event] = []
    calls = 0
    while batch := stage.tick(three_days_later):
        assert len(batch) <= 200
        issued += batch
        calls += 1
    assert calls > 1
    starts = [e.body["interval"]["start"] for e in issued]
    assert len(starts) == len(set(starts)) == 3 * 96 - 2  # all but the last two: still within max_delay
    assert [e.body["seq"] for e in issued] == list(range(1, len(issued) + 1))


def test_an_account_starts_at_the_first_edge_its_first_reading_can_cover(stage: IncentiveStage) -> None:
    events = feed_minutes(stage, A1, range(5, 32), 0.02)  # first reading 5 min into an interval
    assert [r["interval"]["start"] for r in records(events)] == ["2026-11-02T00:15:00Z"]
    assert records(events)[0]["complete"] is True


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
            emitted += stage.process(minute(m))
        second = stage._accounts[1].pseudonym
        stage._db.execute(  # the second account's record insert fails like an I/O error would
            f"CREATE TEMP TRIGGER boom BEFORE INSERT ON records WHEN NEW.account = '{second}' "
            "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
        )
        with pytest.raises(StoreError):
            stage.process([s for m in range(17, 32) for s in minute(m)])
        stage._db.execute("DROP TRIGGER boom")
        for m in range(32, 50):
            emitted += stage.process(minute(m))
        ledger = [row[0] for row in stage._db.execute("SELECT seq FROM records ORDER BY seq")]
    finally:
        stage.close()
    assert sorted(e.body["seq"] for e in emitted) == ledger
