"""Baselines and emission factors: like days (weekday/weekend, DST), minimum history, fixed, time-of-day windows."""

from __future__ import annotations

from datetime import datetime, time
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.incentives.baseline import compute_baseline, like_day_starts
from gateway.incentives.config import EmissionFactor, FixedBaseline, LikeDaysBaseline
from gateway.incentives.stage import IncentiveStage
from tests.unit.incentives.helpers import DEFAULT_INCENTIVES, NS, make_site, reading

Q = 15 * 60 * NS


def at(text: str, zone: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()) * NS


def local(ns: int, zone: str) -> str:
    return datetime.fromtimestamp(ns // NS, ZoneInfo(zone)).strftime("%a %Y-%m-%d %H:%M")


@pytest.mark.parametrize(
    ("zone", "start", "expected"),
    [
        # weekday: the previous weekdays, weekend skipped
        ("Asia/Shanghai", "2026-11-04T18:00", ["Tue 2026-11-03 18:00", "Mon 2026-11-02 18:00", "Fri 2026-10-30 18:00"]),
        # weekend: only Saturdays and Sundays
        ("Asia/Shanghai", "2026-11-08T09:15", ["Sat 2026-11-07 09:15", "Sun 2026-11-01 09:15", "Sat 2026-10-31 09:15"]),
        # a Sunday after spring forward: 02:15 did not exist on Sun 2026-03-29, that day is skipped
        ("Europe/Berlin", "2026-04-05T02:15", ["Sat 2026-04-04 02:15", "Sat 2026-03-28 02:15", "Sun 2026-03-22 02:15"]),
        # after fall back the repeated 02:15 of Sun 2026-10-25 counts once (its first occurrence)
        ("Europe/Berlin", "2026-10-31T02:15", ["Sun 2026-10-25 02:15", "Sat 2026-10-24 02:15", "Sun 2026-10-18 02:15"]),
    ],
)
def test_like_days_in_dst_and_dst_free_zones(zone: str, start: str, expected: list[str]) -> None:
    starts = like_day_starts(at(start, zone), Q, ZoneInfo(zone), lookback_days=14)
    assert [local(s, zone) for s in starts[:3]] == expected
    assert all(s % Q == 0 for s in starts)


def test_fall_back_first_occurrence_is_used() -> None:
    zone = "Europe/Berlin"
    starts = like_day_starts(at("2026-10-31T02:15", zone), Q, ZoneInfo(zone), lookback_days=7)
    assert datetime.fromtimestamp(starts[0] // NS, ZoneInfo(zone)).utcoffset().total_seconds() == 7200  # type: ignore[union-attr]


def test_like_days_mean_uses_the_newest_usable_days_and_needs_min_days() -> None:
    zone = ZoneInfo("Asia/Shanghai")
    start = at("2026-11-04T18:00", "Asia/Shanghai")
    candidates = like_day_starts(start, Q, zone, 45)
    history = {candidates[0]: 300_000, candidates[2]: 500_000, candidates[3]: 400_000, candidates[4]: 1}
    method = LikeDaysBaseline(method="like_days", days=3, min_days=2)
    value = compute_baseline(method, start, Q, zone, lambda starts: {s: history[s] for s in starts if s in history})
    assert value is not None and value.micro_kwh == 400_000
    assert value.days == ((candidates[0], 300_000), (candidates[2], 500_000), (candidates[3], 400_000))  # not the 4th
    thin = compute_baseline(method, start, Q, zone, lambda starts: {candidates[0]: 300_000})
    assert thin is None


def test_excluded_and_abnormal_days_are_never_like_days() -> None:
    zone = ZoneInfo("UTC")
    start = at("2026-11-04T18:00", "UTC")
    candidates = like_day_starts(start, Q, zone, 45)
    history = dict.fromkeys(candidates, 100_000) | {candidates[0]: 900_000}
    method = LikeDaysBaseline(method="like_days", days=2, min_days=2)
    value = compute_baseline(
        method, start, Q, zone, lambda starts: {s: history[s] for s in starts}, skip_day=lambda day: day.day == 3
    )
    assert value is not None and value.micro_kwh == 100_000  # Tue 3 Nov (900 Wh) skipped: Mon 2 and Fri 30 Oct
    assert [s for s, _ in value.days] == [candidates[1], candidates[2]]


def test_fixed_baseline_is_exact() -> None:
    value = compute_baseline(
        FixedBaseline(method="fixed", kwh=Decimal("0.1234565")), 0, Q, ZoneInfo("UTC"), lambda s: {}
    )
    assert value is not None and value.micro_kwh == 123_456  # half-even


@pytest.mark.parametrize(
    ("moment", "factor"),
    [(time(23, 30), "0.7"), (time(5, 59), "0.7"), (time(6, 0), "0.55"), (time(12, 0), "0.6"), (time(18, 0), "0.55")],
)
def test_time_of_day_factor_windows(moment: time, factor: str) -> None:
    windows = EmissionFactor.model_validate(
        {
            "kg_per_kwh": "0.55",
            "by_time_of_day": [
                {"from": "22:00", "to": "06:00", "kg_per_kwh": 0.7},
                {"from": "10:00", "to": "14:00", "kg_per_kwh": 0.6},
            ],
        }
    )
    assert str(windows.at(moment)) == factor


def test_like_days_baseline_through_the_stage_uses_only_usable_history(tmp_path: Path) -> None:
    incentives = DEFAULT_INCENTIVES.replace(
        "baseline: {method: fixed, kwh: 0.5}", "baseline: {method: like_days, days: 3, min_days: 2}"
    ).replace("max_gap: 5min", "max_gap: 15min")
    stage = IncentiveStage.open(make_site(tmp_path, incentives), tmp_path / "data")
    point = "apt1.energy_kwh"
    monday = at("2026-11-02T00:00", "UTC")
    used = [0.8, 0.6, 0.4, 0.7]  # Mon..Thu at 10:00-10:15; 0.1 kWh every other quarter hour
    events = []
    try:
        value = 100.0
        for quarter in range(4 * 96 + 2):  # read at every quarter hour, four days
            ts = monday + quarter * Q
            events += stage.process([reading(point, ts, round(value, 6))], ts)
            value += used[quarter // 96] if quarter % 96 == 40 else 0.1
        events += stage.tick(monday + (4 * 96 + 2) * Q + 2 * 60 * NS)
    finally:
        stage.close()
    by_start = {e.body["interval"]["start"]: e.body for e in events if e.body.get("kind") == "interval"}
    assert by_start["2026-11-02T10:00:00Z"]["status"] == "no_baseline"
    assert by_start["2026-11-03T10:00:00Z"]["status"] == "no_baseline"  # one usable day < min_days
    wednesday = by_start["2026-11-04T10:00:00Z"]
    assert (wednesday["baseline"]["kwh"], len(wednesday["baseline"]["days"]), wednesday["saving_kwh"]) == (
        "0.700000",
        2,
        "0.300000",
    )
    thursday = by_start["2026-11-05T10:00:00Z"]
    assert (thursday["baseline"]["kwh"], thursday["status"], thursday["saving_kwh"]) == (
        "0.600000",
        "measured",
        "0.000000",
    )
