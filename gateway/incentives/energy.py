"""Interval energy from cumulative meter readings: edges, completeness, rollover, resets, replacements.

Owns the pure arithmetic of one meter over one interval. No I/O, no clock, no SQLite: the stage feeds it sorted
readings and stores what it returns, so every rule here is tested as a table.

All energy is integer micro-kWh (1 mWh), so sums are exact and a record's figures add up to the last digit.

How an interval's energy is found
    * The reading used at an edge is the reading nearest to it (the earlier one on a tie). It is a real reading,
      never an interpolation, so an auditor can compare it with the meter. An edge is *covered* when that reading
      lies within ``tolerance`` of it; an interval is complete when both its edges are covered.
    * Once an interval is closed, its end reading is fixed and becomes the next interval's start reading. Consecutive
      intervals therefore share their edge readings and their energies add up exactly to the counter's advance,
      whatever readings arrive late.
    * Between the two edge readings every consecutive pair is inspected: a counter that goes back is a rollover
      (wrap of a configured register width, when the wrapped advance is less than half the range and plausible) or
      else a reset / undeclared replacement, which contributes nothing: a discontinuity never creates consumption
      that is not measured, and an interval holding one is never rewarded.
    * A declared replacement between two readings counts the old meter up to its final reading and the new one from
      its initial reading; without both figures the pair contributes nothing.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from itertools import pairwise

MICRO = 1_000_000
NS_PER_HOUR = 3_600_000_000_000

#: notes that keep an interval from being rewarded (a rollover is exact arithmetic, so it does not)
BLOCKING_NOTES = frozenset({"reset", "replacement", "implausible"})


@dataclass(frozen=True, slots=True, order=True)
class Reading:
    """One meter reading: Unix ns and the counter in micro-kWh."""

    ts_ns: int
    micro_kwh: int


@dataclass(frozen=True, slots=True)
class Replacement:
    """A declared swap at ``at_ns``: readings at or after it come from the new meter."""

    at_ns: int
    old_final_micro: int | None = None
    new_initial_micro: int | None = None


@dataclass(frozen=True, slots=True)
class MeterRules:
    """What is known about one meter beyond its readings."""

    #: the counter wraps to 0 at this value (micro-kWh); None for a counter that never wraps
    wrap_micro: int | None = None
    max_power_kw: float | None = None
    replacements: tuple[Replacement, ...] = ()


@dataclass(frozen=True, slots=True)
class MeterInterval:
    """The energy one meter measured over one interval, with the readings it came from."""

    start: Reading | None
    end: Reading | None
    micro_kwh: int
    complete: bool
    notes: tuple[str, ...] = field(default=())

    @property
    def blocked(self) -> bool:
        return not BLOCKING_NOTES.isdisjoint(self.notes)


def to_micro_kwh(value: object) -> int | None:
    """A reading as micro-kWh, half-even; None for anything that is not a finite, non-negative number.

    Floats go through their shortest repr (``0.1`` is 100000 micro-kWh, not 100000.0000000000055...).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = Decimal(value) if isinstance(value, int) else Decimal(repr(value))
    except InvalidOperation:
        return None
    if not number.is_finite() or number < 0:
        return None
    return int((number * MICRO).to_integral_value(rounding=ROUND_HALF_EVEN))


def format_micro(micro: int) -> str:
    """Micro-kWh (or micro-kg) as a decimal string with six places: ``1500`` -> ``"0.001500"``."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{frac:06d}"


def nearest_reading(readings: Sequence[Reading], edge_ns: int) -> Reading | None:
    """The reading nearest to ``edge_ns`` (the earlier on a tie); ``readings`` sorted by time."""
    if not readings:
        return None
    index = bisect_left(readings, Reading(edge_ns, -1))
    candidates = readings[max(index - 1, 0) : index + 1]
    return min(candidates, key=lambda r: (abs(r.ts_ns - edge_ns), r.ts_ns))


def pair_advance(before: Reading, after: Reading, rules: MeterRules) -> tuple[int, str | None]:
    """Energy between two consecutive readings and a note when it is not a plain rise."""
    for swap in rules.replacements:
        if before.ts_ns < swap.at_ns <= after.ts_ns:
            if swap.old_final_micro is None or swap.new_initial_micro is None:
                return 0, "replacement"
            old_part = swap.old_final_micro - before.micro_kwh
            new_part = after.micro_kwh - swap.new_initial_micro
            if old_part < 0 or new_part < 0:
                return 0, "replacement"  # the declared figures contradict the readings: measure nothing
            return old_part + new_part, "replacement"
    advance = after.micro_kwh - before.micro_kwh
    note: str | None = None
    if advance < 0:
        wrap = rules.wrap_micro
        # Without a power limit a wrap cannot be told from a reset to a low value: measure nothing rather than
        # count a reset as up to half the counter's range (that would feed baselines and mint savings later).
        if wrap is None or rules.max_power_kw is None or advance + wrap >= wrap // 2:
            return 0, "reset"
        advance += wrap
        note = "rollover"
    if rules.max_power_kw is not None:
        hours_ns = after.ts_ns - before.ts_ns
        # the limit in micro-kWh, rounded up by one resolution step so a meter at its limit is not flagged
        limit = int(rules.max_power_kw * MICRO * hours_ns / NS_PER_HOUR) + 1
        if advance > limit:
            return (0, "reset") if note == "rollover" else (advance, "implausible")
    return advance, note


def meter_interval(
    readings: Sequence[Reading],
    start_ns: int,
    end_ns: int,
    *,
    tolerance_ns: int,
    rules: MeterRules,
    fixed_start: Reading | None = None,
) -> MeterInterval:
    """Energy of one meter over ``[start_ns, end_ns)`` from ``readings`` (sorted, unique timestamps).

    ``fixed_start`` is the previous interval's end reading; when given, it is the start reading whatever else
    arrived since, so closed intervals keep adding up.
    """
    start = fixed_start if fixed_start is not None else nearest_reading(readings, start_ns)
    if start is None:
        return MeterInterval(None, None, 0, complete=False)
    # only readings from the start reading on can end the interval (never one before it, even if late)
    first = bisect_left(readings, Reading(start.ts_ns, -1))
    later = readings[first:]
    if not later or later[0].ts_ns != start.ts_ns:
        later = [start, *later]
    end = nearest_reading(later, end_ns)
    assert end is not None
    chain = [r for r in later if r.ts_ns <= end.ts_ns]
    total = 0
    notes: list[str] = []
    for before, after in pairwise(chain):
        advance, note = pair_advance(before, after, rules)
        total += advance
        if note is not None and note not in notes:
            notes.append(note)
    # one reading cannot be both edges (a meter that died mid-interval would read as 0 kWh and the whole baseline
    # as a saving)
    complete = (
        end.ts_ns > start.ts_ns
        and abs(start.ts_ns - start_ns) <= tolerance_ns
        and abs(end.ts_ns - end_ns) <= tolerance_ns
    )
    return MeterInterval(start, end, total, complete=complete, notes=tuple(notes))
