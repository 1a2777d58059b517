"""Interval energy from cumulative meter readings, metering-grade: interpolated edges, validation flags, outliers.

Owns the pure arithmetic of one meter over one interval, exactly as ``docs/incentives.md`` specifies it (the
verifier re-derives every figure from the same rules). No I/O, no clock, no SQLite: the stage feeds it readings and
stores what it returns, so every rule here is tested as a table and over generated faults.

All energy is integer micro-kWh (µkWh), all time integer Unix nanoseconds; every division is a floor on integers,
so the gateway and a verifier in any language get the same digits.

How an interval's energy is found
    * Each pair of consecutive readings has an *advance* (the rise, a wrap, a declared replacement, or 0 for a
      reset) and at most one flag. The advance is spread linearly over the pair's time span; the part before an
      edge ``t`` is ``adv * (t - a.ts) // (b.ts - a.ts)``. So an interval edge is interpolated from the two readings
      that straddle it, and never snapped to the nearest reading (which biased short intervals by poll jitter).
    * A closed interval leaves an :class:`Anchor`: the reading the next interval starts from and how much of its
      pair's advance is already counted. Adjacent intervals therefore add up exactly to the advance of the readings
      between them, whatever arrives late (late readings before a closed edge are refused by the stage).
    * A single reading that breaks the trend in both directions (a ``0`` between two sane readings) is an outlier:
      left out, listed, and the interval flagged ``spike``, so the energy is right and still pays nothing.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from itertools import pairwise

MICRO = 1_000_000
#: watts x nanoseconds -> micro-kWh: 1 W for one hour (3.6e12 ns) is 1,000 µkWh
W_NS_PER_MICRO_KWH = 3_600_000_000
#: a reading above this many kWh is not a meter (1 TWh); it also keeps every figure inside SQLite's 64-bit integers
MAX_KWH = 10**12

#: flags derived from the readings and programme; ``clock`` is added by the stage from what it saw of time
GAP, SPIKE, RESET, REPLACEMENT, STUCK, RESOLUTION, CLOCK = (
    "gap",
    "spike",
    "reset",
    "replacement",
    "stuck",
    "resolution",
    "clock",
)
ROLLOVER = "rollover"  # a note, not a flag: the wrap is exact arithmetic
FLAGS = (GAP, SPIKE, RESET, REPLACEMENT, STUCK, RESOLUTION, CLOCK)
_BREAKS = frozenset({RESET, SPIKE})


@dataclass(frozen=True, slots=True, order=True)
class Reading:
    """One meter reading: Unix ns and the counter in micro-kWh."""

    ts_ns: int
    micro_kwh: int


@dataclass(frozen=True, slots=True)
class Replacement:
    """A declared swap at ``at_ns``: readings after it come from the new meter."""

    at_ns: int
    old_final_micro: int | None = None
    new_initial_micro: int | None = None


@dataclass(frozen=True, slots=True)
class MeterRules:
    """What the programme knows about one meter beyond its readings."""

    #: the most power the meter can see (device rating or the account's supply), whole watts
    limit_w: int
    #: the counter's step in micro-kWh
    resolution_micro: int
    #: the counter wraps to 0 at this value (micro-kWh); None for a counter that never wraps
    wrap_micro: int | None = None
    replacements: tuple[Replacement, ...] = ()


def counted_beyond(micro: int, other: int, rules: MeterRules) -> int:
    """How far the count ``micro`` is ahead of ``other`` (negative: behind), the short way round a wrapping counter:
    just after a wrap, 0.006 kWh is ahead of 65.534 on a 16-bit counter of 0.001 kWh."""
    ahead = micro - other
    wrap = rules.wrap_micro
    if wrap:
        ahead %= wrap
        if ahead > wrap // 2:
            ahead -= wrap
    return ahead


@dataclass(frozen=True, slots=True)
class Anchor:
    """Where a meter's next interval starts: ``reading`` (at or before ``edge_ns``) and the micro-kWh of the pair
    that starts at it that earlier intervals already counted."""

    edge_ns: int
    reading: Reading
    allocated: int = 0
    #: when the run of equal readings that ends at ``reading`` began, if before it (None: at ``reading``). Readings
    #: before the anchor are gone once its interval is issued, so a frozen register that began there is only seen
    #: through this: a meter stuck for half an hour whose catch-up lands in the next interval is still stuck there
    #: (found by the fault property test: a freeze plus a clock step back that pulled the catch-up into the interval)
    run_since_ns: int | None = None


def first_anchor(edge_ns: int, first: Reading, later: Sequence[Reading], rules: MeterRules) -> Anchor:
    """The anchor of a meter's first interval: ``first`` (its last reading at or before ``edge_ns``, else its first
    after it), with the part before the edge of the pair it starts counted as allocated (energy of no interval).

    The pair's other end is the first reading after ``first`` that ``drop_outliers`` keeps, judged over the same
    ``later`` readings that ``meter_interval`` judges: a bad reading right after the first one must not size the
    allocation (it did once: a x100 outlier allocated 11.7 kWh and left the interval with negative energy).
    """
    if first.ts_ns >= edge_ns:
        return Anchor(edge_ns, first, 0)
    kept, _ = drop_outliers([first, *(r for r in later if r.ts_ns > first.ts_ns)], rules)
    if len(kept) < 2:
        return Anchor(edge_ns, first, 0)
    following = kept[1]
    return Anchor(edge_ns, first, portion(pair_advance(first, following, rules)[0], first, following, edge_ns))


@dataclass(frozen=True, slots=True)
class MeterInterval:
    """One meter over one interval: the readings used, the energy, its flags, and the anchor for the next one."""

    readings: tuple[Reading, ...]
    outliers: tuple[Reading, ...]
    allocated: int
    micro_kwh: int
    flags: frozenset[str]
    notes: frozenset[str]
    next_anchor: Anchor
    #: a run of equal readings longer than an interval overlaps this one: a frozen register, unless the household
    #: really used nothing for that long (the stage flags ``stuck`` when the baseline expects energy)
    frozen: bool = False
    #: True when the readings so far cannot decide the interval yet (the last pair may end in an outlier, or a run of
    #: equal readings that started inside the interval has not yet ended nor outlasted an interval)
    needs_more: bool = False
    #: the last run of equal readings started before the end and reaches the last reading given: more readings are
    #: needed to know whether it outlasts an interval
    open_run: bool = False


def to_micro_kwh(value: object) -> int | None:
    """A reading as micro-kWh, half-even; None for anything that is not a finite number in ``0 .. MAX_KWH``.

    Floats go through their shortest repr (``0.1`` is 100000 micro-kWh, not 100000.0000000000055...).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = Decimal(value) if isinstance(value, int) else Decimal(repr(value))
    except InvalidOperation:
        return None
    if not number.is_finite() or number < 0 or number > MAX_KWH:
        return None
    return int((number * MICRO).to_integral_value(rounding=ROUND_HALF_EVEN))


def format_micro(micro: int) -> str:
    """Micro-kWh (or micro-kg) as a decimal string with six places: ``1500`` -> ``"0.001500"``."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{frac:06d}"


def limit_micro(before: Reading, after: Reading, rules: MeterRules) -> int:
    """The most energy the meter can plausibly advance between two readings, plus one counter step."""
    return rules.limit_w * (after.ts_ns - before.ts_ns) // W_NS_PER_MICRO_KWH + rules.resolution_micro


def pair_advance(before: Reading, after: Reading, rules: MeterRules) -> tuple[int, str | None]:
    """The advance between two consecutive readings and its flag or note (``docs/incentives.md``, in that order)."""
    for swap in rules.replacements:
        if before.ts_ns < swap.at_ns <= after.ts_ns:
            if swap.old_final_micro is None or swap.new_initial_micro is None:
                return 0, REPLACEMENT
            old_part = swap.old_final_micro - before.micro_kwh
            new_part = after.micro_kwh - swap.new_initial_micro
            if old_part < 0 or new_part < 0:
                return 0, REPLACEMENT  # the declared figures contradict the readings: measure nothing
            return old_part + new_part, REPLACEMENT
    rise = after.micro_kwh - before.micro_kwh
    limit = limit_micro(before, after, rules)
    if rise < 0:
        # a wrap only when the wrapped advance is plausible under the power limit; anything else is a reset, which
        # measures nothing (a reset counted as a wrap would mint up to half the register's range)
        if rules.wrap_micro is not None and 0 <= rise + rules.wrap_micro <= limit:
            return rise + rules.wrap_micro, ROLLOVER
        return 0, RESET
    if rise > limit:
        return rise, SPIKE
    return rise, None


def portion(advance: int, before: Reading, after: Reading, t_ns: int) -> int:
    """The part of a pair's advance that falls before ``t_ns`` (linear in time, floor)."""
    if t_ns >= after.ts_ns:
        return advance
    if t_ns <= before.ts_ns:
        return 0
    return advance * (t_ns - before.ts_ns) // (after.ts_ns - before.ts_ns)


def drop_outliers(readings: Sequence[Reading], rules: MeterRules) -> tuple[list[Reading], list[Reading]]:
    """Readings with single-reading outliers removed, and the outliers.

    One pass, left to right: ``o`` is an outlier when the pairs (last kept, o) and (o, next) are both a break
    (reset or spike) and (last kept, next) is not. The first reading (the anchor) and the last are never judged.
    """
    if len(readings) < 3:
        return list(readings), []
    kept = [readings[0]]
    outliers: list[Reading] = []
    for index in range(1, len(readings) - 1):
        current = readings[index]
        if is_outlier(kept[-1], current, readings[index + 1], rules):
            outliers.append(current)
            continue
        kept.append(current)
    kept.append(readings[-1])
    return kept, outliers


def is_outlier(previous: Reading, current: Reading, following: Reading, rules: MeterRules) -> bool:
    """The pairs into and out of ``current`` are both breaks (reset or spike) and the pair skipping it is not."""
    return (
        pair_advance(previous, current, rules)[1] in _BREAKS
        and pair_advance(current, following, rules)[1] in _BREAKS
        and pair_advance(previous, following, rules)[1] not in _BREAKS
    )


def meter_interval(
    anchor: Anchor,
    later: Sequence[Reading],
    start_ns: int,
    end_ns: int,
    *,
    rules: MeterRules,
    max_gap_ns: int,
    more_exist: bool = False,
) -> MeterInterval:
    """One meter over ``[start_ns, end_ns)`` from its anchor and the readings after it (sorted, unique times).

    ``later`` should run past the end: up to one interval length beyond it and three readings more, so that an
    outlier at the end and a run of equal readings across it can be judged. ``more_exist`` says that the meter has
    sent readings beyond ``later``; without them the verdict may be "wait" (``needs_more``).
    """
    # A reading between the anchor and the start was judged by the interval before (the anchor is the last reading
    # it kept before its end, so anything after the anchor and at or before this start was one of its outliers). It
    # is never judged again here: among other neighbours it could be kept and become a second reading before the
    # start, which the record format does not allow (found by the fault property test: a clock step back plus a bad
    # 0 reading). It is listed as this interval's outlier too, so that a spike at an edge flags both intervals it
    # touches, where the verifier sees it as one: alone between the anchor and the next kept reading, with both
    # pairs around it breaks and the pair skipping it not (a reading that arrived late, stamped in between, can
    # change its neighbours since the interval before judged it; then it is left to that interval's record).
    judged_until = max(anchor.reading.ts_ns, start_ns)
    judged_before = [r for r in later if anchor.reading.ts_ns < r.ts_ns <= judged_until]
    sequence = [anchor.reading, *(r for r in later if r.ts_ns > judged_until)]
    kept, outliers = drop_outliers(sequence, rules)
    if len(judged_before) == 1 and len(kept) >= 2:
        edge_outlier, following = judged_before[0], kept[1]
        alone = not any(o.ts_ns < following.ts_ns for o in outliers)
        if alone and is_outlier(anchor.reading, edge_outlier, following, rules):
            outliers = [edge_outlier, *outliers]
    chain: list[Reading] = []
    for reading in kept:
        chain.append(reading)
        if reading.ts_ns >= end_ns:
            break
    flags: set[str] = set()
    notes: set[str] = set()
    total = 0
    pairs = list(pairwise(chain))
    for before, after in pairs:
        advance, mark = pair_advance(before, after, rules)
        if mark == ROLLOVER:
            notes.add(mark)
        elif mark is not None:
            flags.add(mark)
        if after.ts_ns - before.ts_ns > max_gap_ns:
            flags.add(GAP)
        total += portion(advance, before, after, end_ns)
    # What the interval before counted of the pair that starts at the anchor comes off. It counted it from its own
    # view of that pair; when a reading it ended the pair with is an outlier here (readings stamped in between
    # arrived after it closed: a clock step), the pair is another one and the allocation may exceed everything
    # this interval holds. Then no more than that is given back: never a negative energy (the excess stays counted
    # by the interval before, which can only lower a saving, and both intervals are flagged gap).
    allocated = min(anchor.allocated, total)
    total -= allocated
    last = chain[-1]
    if last.ts_ns < end_ns:
        flags.add(GAP)  # no reading at or after the end (closed overdue): the rest is counted by the next interval
    first_pair_at_start = portion(pair_advance(*pairs[0], rules)[0], *pairs[0], start_ns) if pairs else 0
    if chain[0].ts_ns > start_ns or (pairs and allocated != first_pair_at_start):
        flags.add(GAP)  # energy from before the start lands here (the previous interval closed without a reading)
    if last.ts_ns >= end_ns and len(chain) >= 2:
        if last.ts_ns == end_ns:
            next_anchor = Anchor(end_ns, last, 0)
        else:
            before = chain[-2]
            next_anchor = Anchor(end_ns, before, portion(pair_advance(before, last, rules)[0], before, last, end_ns))
    else:
        # nothing reached the end: the next interval continues from the last reading with nothing of its pair counted
        # (it is flagged ``gap`` there, since that pair's energy before its start is counted in it)
        next_anchor = Anchor(end_ns, last, anchor.allocated if len(chain) == 1 else 0)
    next_anchor = replace(next_anchor, run_since_ns=_run_since(kept, next_anchor.reading, anchor))
    outliers_used = tuple(o for o in outliers if o.ts_ns < last.ts_ns)
    if outliers_used:
        flags.add(SPIKE)
    # the last pair is a break and nothing after it is known yet: one more reading might show its end to be an
    # outlier, so it is worth waiting for (until the interval is overdue)
    needs_more = (
        not more_exist
        and last is sequence[-1]
        and len(chain) >= 2
        and pair_advance(chain[-2], last, rules)[1] in _BREAKS
    )
    frozen, open_run = _frozen(kept, start_ns, end_ns, end_ns - start_ns, first_since=anchor.run_since_ns)
    needs_more = needs_more or (open_run and not more_exist)
    return MeterInterval(
        readings=tuple(chain),
        outliers=outliers_used,
        allocated=allocated,
        micro_kwh=total,
        flags=frozenset(flags),
        notes=frozenset(notes),
        next_anchor=next_anchor,
        frozen=frozen,
        needs_more=needs_more,
        open_run=open_run,
    )


def _run_since(kept: Sequence[Reading], reading: Reading, anchor: Anchor) -> int | None:
    """When the run of equal readings in ``kept`` that ends at ``reading`` began, if before it; through ``anchor``
    (the first of ``kept``) when the run goes back to it."""
    index = kept.index(reading)
    start = index
    while start > 0 and kept[start - 1].micro_kwh == reading.micro_kwh:
        start -= 1
    if start == 0 and kept[0].micro_kwh == reading.micro_kwh and anchor.run_since_ns is not None:
        return anchor.run_since_ns
    return kept[start].ts_ns if start < index else None


def _frozen(
    readings: Sequence[Reading], start_ns: int, end_ns: int, limit_ns: int, *, first_since: int | None = None
) -> tuple[bool, bool]:
    """(a span without advance longer than ``limit_ns`` overlaps the interval, the last run is still undecided).

    ``first_since``: when the run that the first reading belongs to began, if earlier (``Anchor.run_since_ns``).

    A run is a maximal sequence of consecutive readings with the same value. The span in which the meter was seen not
    to advance lasts from the run's first reading to the next reading (the one that rises): where in that last pair
    the rise happened nobody knows, so a frozen register hidden partly by missing readings still shows. The last
    run, with no reading after it yet, is undecided while it started before the end and is not longer than the
    limit: the next reading may continue it (frozen) or rise (a quiet spell). The limit is one interval: a household
    that uses less than one counter step in a whole interval cannot show a saving anyway.
    """
    frozen = False
    run_start = 0
    # the earlier start counts only while the run goes on past the first reading: that is where a verifier, seeing
    # the record's readings begin with two equal ones, can accept a run it cannot see the start of. A run that ends
    # at the first reading hands its catch-up to the pair after it, which can only make this interval's energy
    # larger (never a saving nobody earned); the intervals it froze were flagged when they closed.
    continues = len(readings) >= 2 and readings[1].micro_kwh == readings[0].micro_kwh
    since = readings[0].ts_ns if first_since is None or not continues else min(first_since, readings[0].ts_ns)
    for index in range(1, len(readings)):
        if readings[index].micro_kwh == readings[run_start].micro_kwh:
            continue
        after = readings[index]
        if since < end_ns and after.ts_ns > start_ns and after.ts_ns - since > limit_ns:
            frozen = True
        run_start = index
        since = after.ts_ns
    last = readings[-1]
    if since < end_ns and last.ts_ns > start_ns and last.ts_ns - since > limit_ns:
        frozen = True
    undecided = run_start < len(readings) - 1 and since < end_ns and last.ts_ns - since <= limit_ns
    return frozen, undecided


def float32_step_micro(micro: int) -> int:
    """The spacing of IEEE float32 numbers at a reading, in micro-kWh, when the reading is exactly a float32 (a meter
    that stores its counter as float32 cannot count finer than this); 0 otherwise."""
    if micro <= 0:
        return 0
    value = float(Decimal(micro) / MICRO)
    try:
        if struct.unpack("<f", struct.pack("<f", value))[0] != value:
            return 0
    except OverflowError:
        return 0
    _, exponent = math.frexp(value)
    step = Decimal(2) ** (exponent - 24) * MICRO
    return int(step.to_integral_value(rounding="ROUND_CEILING"))


def resolution_step(readings: Sequence[Reading], rules: MeterRules) -> int:
    """The coarsest counter step the readings allow: the configured resolution, or the float32 spacing when every
    reading is exactly a float32 (one such value among decimals is chance: ``12345.5`` is a float32 too)."""
    steps = [float32_step_micro(r.micro_kwh) for r in readings]
    if not steps or not all(steps):
        return rules.resolution_micro
    return max(rules.resolution_micro, *steps)
