"""Interval energy of one meter, as a table: (readings, rules) -> (kWh, complete, notes)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.incentives.energy import (
    MeterRules,
    Reading,
    Replacement,
    format_micro,
    meter_interval,
    nearest_reading,
    to_micro_kwh,
)

NS = 1_000_000_000
MIN = 60 * NS
START, END = 0, 15 * MIN
TOL = 1 * MIN
NO_RULES = MeterRules()
WRAP_32 = 2**32 * 10_000  # a 32-bit count of 0.01 kWh, in micro-kWh


def kwh(value: float) -> int:
    micro = to_micro_kwh(value)
    assert micro is not None
    return micro


def r(minute: float, value: float) -> Reading:
    return Reading(int(minute * MIN), kwh(value))


@dataclass(frozen=True)
class Row:
    name: str
    readings: list[Reading]
    expected_kwh: str
    complete: bool
    notes: tuple[str, ...] = ()
    rules: MeterRules = NO_RULES
    fixed_start: Reading | None = None


ROWS = [
    Row("normal: readings on both edges", [r(0, 100), r(5, 100.2), r(10, 100.4), r(15, 100.6)], "0.600000", True),
    Row("edges within tolerance", [r(-0.5, 100), r(7, 100.3), r(15.9, 100.7)], "0.700000", True),
    Row(
        "nearest edge reading wins, ties go to the earlier",
        [r(-1, 99.9), r(1, 100.1), r(14, 100.5), r(16, 100.7)],
        "0.600000",
        True,
    ),
    Row("missing start reading: incomplete", [r(3, 100), r(15, 100.6)], "0.600000", False),
    Row("missing end reading: incomplete", [r(0, 100), r(10, 100.4)], "0.400000", False),
    Row("no readings at all", [], "0.000000", False),
    Row(
        "rollover of a 32-bit counter counts the wrapped advance",
        [Reading(0, WRAP_32 - kwh(0.3)), Reading(8 * MIN, kwh(0.1)), Reading(15 * MIN, kwh(0.4))],
        "0.700000",
        True,
        ("rollover",),
        MeterRules(wrap_micro=WRAP_32, max_power_kw=40),
    ),
    Row(
        "without a power limit a wrap cannot be told from a reset: nothing counted across it",
        [Reading(0, WRAP_32 - kwh(0.3)), Reading(8 * MIN, kwh(0.1)), Reading(15 * MIN, kwh(0.4))],
        "0.300000",
        True,
        ("reset",),
        MeterRules(wrap_micro=WRAP_32),
    ),

    Row(
        "a drop without a configured width is a reset: nothing counted across it",
        [r(0, 500), r(5, 500.2), r(6, 0.0), r(15, 0.3)],
        "0.500000",
        True,
        ("reset",),
    ),
    Row(
        "a drop far from the wrap point is a reset even with a width",
        [r(0, 500), r(6, 0.1), r(15, 0.3)],
        "0.200000",
        True,
        ("reset",),
        MeterRules(wrap_micro=WRAP_32),
    ),
    Row(
        "declared replacement with both figures counts old and new meter",
        [r(0, 800), r(5, 800.2), r(10, 0.1), r(15, 0.4)],
        "0.900000",
        True,
        ("replacement",),
        MeterRules(replacements=(Replacement(7 * MIN, kwh(800.5), kwh(0.0)),)),
    ),
    Row(
        "declared replacement without figures: the swap pair counts nothing",
        [r(0, 800), r(5, 800.2), r(10, 0.1), r(15, 0.4)],
        "0.500000",
        True,
        ("replacement",),
        MeterRules(replacements=(Replacement(7 * MIN),)),
    ),
    Row(
        "implausible jump is flagged (and blocks any saving)",
        [r(0, 100), r(1, 150), r(15, 150.1)],
        "50.100000",
        True,
        ("implausible",),
        MeterRules(max_power_kw=30.0),
    ),
    Row(
        "power at the limit is plausible",
        [r(0, 100), r(60 / 60, 100.5), r(15, 101)],
        "1.000000",
        True,
        (),
        MeterRules(max_power_kw=30.0),
    ),
    Row(
        "fixed start (previous end) is used even if a nearer reading arrived late",
        [r(-0.5, 100), r(0.1, 100.05), r(15, 100.6)],
        "0.500000",
        True,
        (),
        MeterRules(),
        r(0.2, 100.1),
    ),
    Row(
        "a late reading older than the fixed start never ends the interval",
        [r(-5, 99), r(15.5, 100.6)],
        "0.600000",
        True,
        (),
        MeterRules(),
        r(0.5, 100.0),
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_interval_energy(row: Row) -> None:
    readings = sorted(row.readings)
    if row.fixed_start is not None:
        readings = sorted({*readings, row.fixed_start})
    result = meter_interval(readings, START, END, tolerance_ns=TOL, rules=row.rules, fixed_start=row.fixed_start)
    assert format_micro(result.micro_kwh) == row.expected_kwh
    assert result.complete is row.complete
    assert result.notes == row.notes
    assert result.blocked is bool({"reset", "replacement", "implausible"} & set(row.notes))


@pytest.mark.parametrize(
    ("value", "micro"),
    [(0.1, 100_000), (123.4567895, 123_456_790), (123.4567885, 123_456_788), (7, 7_000_000), (0, 0)],
)
def test_readings_become_exact_micro_kwh(value: float, micro: int) -> None:
    assert to_micro_kwh(value) == micro


@pytest.mark.parametrize("value", [-0.001, float("nan"), float("inf"), True, "12.5", None])
def test_non_readings_are_refused(value: object) -> None:
    assert to_micro_kwh(value) is None


def test_nearest_reading_prefers_the_earlier_on_a_tie() -> None:
    readings = [r(-1, 1), r(1, 2)]
    assert nearest_reading(readings, 0) == readings[0]
    assert nearest_reading([], 0) is None


@pytest.mark.parametrize(
    ("micro", "text"), [(0, "0.000000"), (1, "0.000001"), (1_500_000, "1.500000"), (-5, "-0.000005")]
)
def test_format_micro(micro: int, text: str) -> None:
    assert format_micro(micro) == text


def test_one_reading_is_never_both_edges() -> None:
    """With a tolerance of half the interval, a lone mid-interval reading is near both edges: still incomplete, or
    the interval would read 0 kWh and pay the whole baseline as a saving (found in review)."""
    lone = [Reading(START + 7 * MIN + 30_000_000_000, kwh(100.0))]
    result = meter_interval(lone, START, END, tolerance_ns=7 * MIN + 30_000_000_000, rules=NO_RULES)
    assert result.micro_kwh == 0
    assert not result.complete
