"""The arithmetic of one meter over one interval, as tables: readings, pairs, edges, outliers, flags."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.incentives.energy import (
    GAP,
    REPLACEMENT,
    RESET,
    ROLLOVER,
    SPIKE,
    Anchor,
    MeterRules,
    Reading,
    Replacement,
    counted_beyond,
    first_anchor,
    float32_step_micro,
    format_micro,
    meter_interval,
    pair_advance,
    portion,
    to_micro_kwh,
)

S = 1_000_000_000
MIN = 60 * S
RULES = MeterRules(limit_w=40_000, resolution_micro=1_000)  # 40 kW, 0.001 kWh
WRAPPING = MeterRules(limit_w=40_000, resolution_micro=10_000, wrap_micro=655_360_000)  # 16 bits of 0.01 kWh


@pytest.mark.parametrize(
    ("value", "micro"),
    [
        (0, 0),
        (0.1, 100_000),
        (1234.5678915, 1_234_567_892),  # half-even at the 7th place, from the shortest repr
        (10**12, 10**18),
        (10**12 + 1, None),  # over 1 TWh: not a meter (and would overflow SQLite)
        (1e13, None),
        (float("nan"), None),
        (float("inf"), None),
        (-0.5, None),
        (True, None),
        ("12", None),
    ],
)
def test_readings_become_micro_kwh_or_are_refused(value: object, micro: int | None) -> None:
    assert to_micro_kwh(value) == micro


@pytest.mark.parametrize(
    ("rules", "before", "after", "expected"),
    [
        (RULES, Reading(0, 1_000_000), Reading(60 * S, 1_100_000), (100_000, None)),  # 6 kW: plain
        (RULES, Reading(0, 1_000_000), Reading(60 * S, 1_000_000), (0, None)),
        (RULES, Reading(0, 1_000_000), Reading(60 * S, 2_000_000), (1_000_000, SPIKE)),  # 60 kW > 40 kW
        (RULES, Reading(0, 1_000_000), Reading(60 * S, 0), (0, RESET)),  # a bad zero
        (RULES, Reading(0, 1_000_000), Reading(60 * S, 999_999), (0, RESET)),  # no wrap configured
        # 655.35 kWh -> 0.01 kWh in a minute: wrapped advance 0.02 kWh, plausible under 40 kW
        (WRAPPING, Reading(0, 655_350_000), Reading(60 * S, 10_000), (20_000, ROLLOVER)),
        # a fall to a mid value: the wrapped advance (655 kWh in a minute) is implausible, so it is a reset
        (WRAPPING, Reading(0, 655_350_000), Reading(60 * S, 300_000_000), (0, RESET)),
        # a fall from above the register's range (a bad reading) is never a wrap: the advance would be negative
        (WRAPPING, Reading(0, 1_000_300_000), Reading(60 * S, 10_006_000), (0, RESET)),
    ],
)
def test_pair_advance(rules: MeterRules, before: Reading, after: Reading, expected: tuple[int, str | None]) -> None:
    assert pair_advance(before, after, rules) == expected


def test_declared_replacement_counts_old_and_new_parts_and_is_flagged() -> None:
    swap = Replacement(30 * S, old_final_micro=5_050_000, new_initial_micro=0)
    rules = MeterRules(limit_w=40_000, resolution_micro=1_000, replacements=(swap,))
    assert pair_advance(Reading(0, 5_000_000), Reading(60 * S, 20_000), rules) == (70_000, REPLACEMENT)
    unknown = MeterRules(limit_w=40_000, resolution_micro=1_000, replacements=(Replacement(30 * S),))
    assert pair_advance(Reading(0, 5_000_000), Reading(60 * S, 20_000), unknown) == (0, REPLACEMENT)


def test_portion_is_linear_and_floored() -> None:
    a, b = Reading(0, 0), Reading(3 * S, 0)
    assert [portion(10, a, b, t * S) for t in range(5)] == [0, 3, 6, 10, 10]


def _energy(readings: list[Reading], start: int, end: int, allocated: int = 0) -> tuple[int, frozenset[str]]:
    anchor = Anchor(start, readings[0], allocated)
    result = meter_interval(anchor, readings[1:], start, end, rules=RULES, max_gap_ns=5 * MIN)
    return result.micro_kwh, result.flags


def test_edges_are_interpolated_between_the_straddling_readings() -> None:
    # 6 kW steady, read at :50 past each minute: the interval [1 min, 3 min) gets exactly 0.2 kWh
    readings = [Reading(50 * S + i * MIN, 1_000_000 + i * 100_000) for i in range(5)]
    first = Anchor(MIN, readings[0], portion(100_000, readings[0], readings[1], MIN))
    result = meter_interval(first, readings[1:], MIN, 3 * MIN, rules=RULES, max_gap_ns=5 * MIN)
    assert (result.micro_kwh, result.flags) == (200_000, frozenset())
    assert result.next_anchor == Anchor(3 * MIN, readings[2], portion(100_000, readings[2], readings[3], 3 * MIN))


def test_a_bad_zero_at_an_edge_is_an_outlier_measured_right_and_flagged() -> None:
    readings = [Reading(0, 5_000_000), Reading(30 * S, 5_050_000), Reading(60 * S, 0), Reading(90 * S, 5_150_000)]
    readings += [Reading(120 * S, 5_200_000)]
    result = meter_interval(Anchor(0, readings[0]), readings[1:], 0, 60 * S, rules=RULES, max_gap_ns=5 * MIN)
    assert result.outliers == (Reading(60 * S, 0),)
    assert result.micro_kwh == 100_000  # the true 0.1 kWh: the zero is left out, the edge interpolated across it
    assert SPIKE in result.flags and RESET not in result.flags


def test_an_edge_outlier_judged_by_the_interval_before_is_never_a_second_reading_before_the_start() -> None:
    # The interval [0, 60 s) kept the reading at 30 s as the next anchor and dropped the bad 0 at 45 s. A reading
    # then arrives late, stamped 61 s (a clock stepped back), between the 0 and the reading at 90 s: judged again with
    # it as a neighbour the 0 would be kept. It stays out of the readings (found by the fault property test, seed 2).
    anchor = Anchor(60 * S, Reading(30 * S, 5_050_000), 0)
    later = [Reading(45 * S, 0), Reading(61 * S, 5_101_000), Reading(90 * S, 5_150_000), Reading(120 * S, 5_200_000)]
    result = meter_interval(anchor, later, 60 * S, 120 * S, rules=RULES, max_gap_ns=5 * MIN)
    assert [r.ts_ns for r in result.readings if r.ts_ns <= 60 * S] == [30 * S]
    assert Reading(45 * S, 0) not in result.readings


def test_an_edge_outlier_judged_before_flags_the_next_interval_too_when_it_is_one_there() -> None:
    readings = [Reading(0, 5_000_000), Reading(30 * S, 5_050_000), Reading(60 * S, 0), Reading(90 * S, 5_150_000)]
    readings += [Reading(120 * S, 5_200_000), Reading(150 * S, 5_250_000)]
    first = meter_interval(Anchor(0, readings[0]), readings[1:], 0, 60 * S, rules=RULES, max_gap_ns=5 * MIN)
    second = meter_interval(first.next_anchor, readings[2:], 60 * S, 120 * S, rules=RULES, max_gap_ns=5 * MIN)
    assert first.outliers == second.outliers == (Reading(60 * S, 0),)
    assert SPIKE in second.flags and second.readings[0] == Reading(30 * S, 5_050_000)
    assert first.micro_kwh + second.micro_kwh == 200_000  # 30 s .. 150 s at 6 kW, less the anchor's allocation


def test_a_first_anchor_is_not_sized_by_an_outlier_right_after_it() -> None:
    # The meter's first reading is just before the start and the next one is a x100 value: the allocation comes from
    # the next reading kept, not from the outlier (which once allocated 11.7 kWh and left a negative interval).
    first = Reading(-1 * S, 10_000_000)
    later = [Reading(84 * S, 1_001_400_000), Reading(163 * S, 10_091_000), Reading(244 * S, 10_095_000)]
    later += [Reading(316 * S, 10_100_000)]
    anchor = first_anchor(0, first, later, RULES)
    assert anchor.allocated == portion(91_000, first, later[1], 0)
    result = meter_interval(anchor, later, 0, 5 * MIN, rules=RULES, max_gap_ns=5 * MIN)
    assert result.micro_kwh >= 0 and GAP not in result.flags
    assert result.outliers == (later[0],)


def test_a_frozen_run_that_began_before_the_anchor_still_counts_from_its_start() -> None:
    # The register has read 1.000 kWh since 0 min; the interval [15 min, 30 min) sees the end of that run and the
    # catch-up at 22 min. Only 8 of its minutes are equal readings, but the run lasted 22: stuck, never a saving.
    anchor = Anchor(15 * MIN, Reading(14 * MIN, 1_000_000), 0, run_since_ns=0)
    later = [Reading(t * MIN, 1_000_000) for t in (16, 18, 20)]
    later += [Reading(22 * MIN, 1_900_000), Reading(26 * MIN, 2_000_000), Reading(31 * MIN, 2_100_000)]
    result = meter_interval(anchor, later, 15 * MIN, 30 * MIN, rules=RULES, max_gap_ns=5 * MIN)
    assert result.frozen
    # without what the anchor remembers, the same readings look like a quiet spell
    forgetful = meter_interval(
        replace(anchor, run_since_ns=None), later, 15 * MIN, 30 * MIN, rules=RULES, max_gap_ns=5 * MIN
    )
    assert not forgetful.frozen


def test_the_next_anchor_remembers_where_its_run_began() -> None:
    anchor = Anchor(0, Reading(0, 1_000_000), 0, run_since_ns=-10 * MIN)
    later = [Reading(t * MIN, 1_000_000) for t in (2, 4, 6)] + [Reading(6 * MIN + 1, 1_000_000)]
    first = meter_interval(anchor, later, 0, 5 * MIN, rules=RULES, max_gap_ns=5 * MIN)
    assert first.next_anchor.run_since_ns == -10 * MIN  # the whole run, back through the anchor
    rising = [Reading(2 * MIN, 1_100_000), Reading(4 * MIN, 1_100_000), Reading(6 * MIN, 1_200_000)]
    second = meter_interval(anchor, rising, 0, 5 * MIN, rules=RULES, max_gap_ns=5 * MIN)
    assert second.next_anchor.run_since_ns == 2 * MIN  # 4 min continues the run that began at 2 min


def test_an_allocation_from_a_pair_this_interval_does_not_have_never_makes_its_energy_negative() -> None:
    # The interval before ended its last pair with a x1000 reading at 5 s and allocated 63 kWh of it; here, with the
    # readings that arrived since, that reading is an outlier. At most what this interval holds is given back.
    anchor = Anchor(0, Reading(-60 * S, 29_000), 63_000_000)
    later = [Reading(5 * S, 64_036_000), Reading(49 * S, 428_000), Reading(106 * S, 443_000)]
    later += [Reading(169 * S, 447_000), Reading(310 * S, 560_000)]
    result = meter_interval(anchor, later, 0, 5 * MIN, rules=RULES, max_gap_ns=5 * MIN)
    assert result.outliers == (later[0],)
    # everything it holds (0.029 kWh at the anchor to 0.551985 interpolated at the end) and no more
    assert result.micro_kwh == 0 and result.allocated == 551_985 - 29_000 and GAP in result.flags


def test_counted_beyond_goes_the_short_way_round_a_wrapping_counter() -> None:
    sixteen_bits = MeterRules(limit_w=10_000, resolution_micro=1_000, wrap_micro=65_536_000)
    assert counted_beyond(6_000, 65_534_000, sixteen_bits) == 8_000  # just after the wrap: further, not behind
    assert counted_beyond(65_534_000, 6_000, sixteen_bits) == -8_000
    assert counted_beyond(6_000, 65_534_000, RULES) == -65_528_000  # a counter that never wraps


def test_an_edge_is_not_interpolated_across_more_than_max_gap() -> None:
    readings = [Reading(0, 0), Reading(10 * MIN, 1_000_000)]
    energy, flags = _energy(readings, 0, 5 * MIN)
    assert (energy, flags) == (500_000, frozenset({GAP}))


def test_no_reading_past_the_end_flags_gap_and_the_next_interval_counts_the_rest() -> None:
    readings = [Reading(0, 0), Reading(2 * MIN, 100_000)]
    first = meter_interval(Anchor(0, readings[0]), readings[1:], 0, 5 * MIN, rules=RULES, max_gap_ns=5 * MIN)
    assert (first.micro_kwh, GAP in first.flags) == (100_000, True)
    later = [Reading(6 * MIN, 150_000), Reading(11 * MIN, 300_000)]
    second = meter_interval(first.next_anchor, later, 5 * MIN, 10 * MIN, rules=RULES, max_gap_ns=5 * MIN)
    # the pair 2 min -> 6 min is counted whole here (flagged: part of it belongs to the closed interval)
    assert GAP in second.flags
    # conservation: the advance up to the anchor's reading, plus what is already allocated of the pair after it
    assert second.next_anchor == Anchor(10 * MIN, Reading(6 * MIN, 150_000), 120_000)
    assert first.micro_kwh + second.micro_kwh == 150_000 + 120_000


def test_a_run_of_equal_readings_longer_than_max_gap_is_frozen() -> None:
    readings = [Reading(i * MIN, 1_000_000) for i in range(8)] + [Reading(8 * MIN, 1_010_000)]
    result = meter_interval(Anchor(0, readings[0]), readings[1:], 0, 5 * MIN, rules=RULES, max_gap_ns=5 * MIN)
    assert result.frozen and result.micro_kwh == 0


def test_an_open_run_across_the_end_waits_for_more_readings() -> None:
    readings = [Reading(0, 0), Reading(4 * MIN, 100_000), Reading(5 * MIN, 100_000)]
    result = meter_interval(Anchor(0, readings[0]), readings[1:], 0, 5 * MIN, rules=RULES, max_gap_ns=5 * MIN)
    assert result.needs_more and not result.frozen


@pytest.mark.parametrize(("kwh", "step"), [(2.0**24, 2_000_000), (1234.5, 123), (0.1, 0), (123.456789, 0)])
def test_float32_counter_step(kwh: float, step: int) -> None:
    assert float32_step_micro(to_micro_kwh(kwh) or 0) == step


def test_format_micro() -> None:
    assert [format_micro(m) for m in (0, 1500, -1, 10**12)] == ["0.000000", "0.001500", "-0.000001", "1000000.000000"]


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.integers(1, 400), min_size=2, max_size=60),
    rises=st.lists(st.integers(0, 3_000), min_size=60, max_size=60),
    interval_s=st.sampled_from([60, 300, 900]),
)
def test_adjacent_intervals_add_up_exactly_to_the_readings_advance(
    gaps: list[int], rises: list[int], interval_s: int
) -> None:
    """Conservation: whatever the poll times, the intervals' energies and the carried allocation telescope."""
    times = [0]
    for gap in gaps:
        times.append(times[-1] + gap * S)
    values = [0]
    for rise in rises[: len(times) - 1]:
        values.append(values[-1] + rise)
    readings = [Reading(t, v) for t, v in zip(times, values, strict=True)]
    step = interval_s * S
    start = -(-times[0] // step) * step
    anchor = Anchor(start, readings[0], 0)
    total = 0
    edge = start
    while edge + step <= times[-1]:
        result = meter_interval(
            anchor,
            [r for r in readings if r.ts_ns > anchor.reading.ts_ns],
            edge,
            edge + step,
            rules=MeterRules(limit_w=10**9, resolution_micro=1),
            max_gap_ns=10**18,
            more_exist=True,
        )
        total += result.micro_kwh
        anchor = result.next_anchor
        edge += step
    # everything up to the last closed edge, plus what the anchor already allocated of its pair
    counted = total
    expected = sum(b.micro_kwh - a.micro_kwh for a, b in pairwise(readings) if b.ts_ns <= anchor.reading.ts_ns)
    assert counted == expected + anchor.allocated
