"""The pure parts of adaptive reads and CLI honesty: splitting a refused read, limits from site and session, and
values printed at their point's precision."""

from __future__ import annotations

import pytest

from drivers.modbus.cli import format_at_precision, probe_header
from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig, ModbusPoint, ModbusProfile
from drivers.modbus.planner import plan_device, plan_reads, split_request
from drivers.modbus.source import ReadLimit

BUS = ModbusBusConfig.model_validate({"id": "b", "type": "tcp", "host": "h"})


def points(*specs: tuple[int, str]) -> list[tuple[str, ModbusPoint]]:
    return [
        (f"d.p{address}", ModbusPoint.model_validate({"table": "holding", "address": address, "type": kind}))
        for address, kind in specs
    ]


def test_a_read_splits_at_the_middle_of_its_span() -> None:
    [read] = plan_reads(1, points(*((a, "u16") for a in range(100))), max_fill=8, max_fill_bits=64)
    first, second = split_request(read, "ABCD")
    assert (first.address, first.count, second.address, second.count) == (0, 50, 50, 50)
    assert first.point_ids + second.point_ids == read.point_ids
    assert first.block is not None and second.block is not None, "each piece decodes on its own"


def test_a_split_never_cuts_a_wide_value() -> None:
    [read] = plan_reads(1, points((0, "f64"), (4, "f64")), max_fill=8, max_fill_bits=64)
    first, second = split_request(read, "ABCD")
    assert (first.address, first.count) == (0, 4)
    assert (second.address, second.count) == (4, 4)


def test_the_cut_falls_between_points_never_leaving_an_empty_piece() -> None:
    [read] = plan_reads(1, points((0, "u16"), (7, "u16"), (8, "u16"), (9, "u16")), max_fill=8, max_fill_bits=64)
    first, second = split_request(read, "ABCD")
    assert first.point_ids == ("d.p0",) and second.point_ids == ("d.p7", "d.p8", "d.p9")
    assert second.address == 7 and second.count == 3 and second.fill == 0


def test_points_all_starting_before_the_middle_are_split_by_count() -> None:
    # a long string at the end makes the span 0..9 while every point starts before its middle (5)
    items = points((0, "u16"), (1, "u16"))
    name = ModbusPoint.model_validate({"table": "holding", "address": 2, "type": "string", "length": 8})
    items.append(("d.name", name))
    [read] = plan_reads(1, items, max_fill=8, max_fill_bits=64)
    assert (read.address, read.count) == (0, 10)
    first, second = split_request(read, "ABCD")
    assert first.point_ids == ("d.p0",)
    assert second.point_ids == ("d.p1", "d.name") and (second.address, second.count) == (1, 9)


def test_a_single_point_cannot_be_split() -> None:
    [read] = plan_reads(1, points((0, "u32")), max_fill=8, max_fill_bits=64)
    with pytest.raises(ValueError, match="one point"):
        split_request(read, "ABCD")


PROFILE = ModbusProfile.model_validate(
    {
        "driver": "modbus",
        "vendor": "T",
        "model": "T",
        "doc": "test",
        "max_registers": 100,
        "points": {f"r{i}": {"table": "input", "address": i, "type": "u16"} for i in range(120)},
    }
)


@pytest.mark.parametrize(
    ("learned", "no_fill", "counts"),
    [
        (None, False, [100, 20]),
        (40, False, [40, 40, 40]),
        (200, False, [100, 20]),  # a learned limit only ever tightens the configured one
    ],
)
def test_learned_limits_tighten_the_plan(learned: int | None, no_fill: bool, counts: list[int]) -> None:
    device = ModbusDeviceConfig(id="d", driver="modbus", profile="t", bus="b", unit=1)
    plan = plan_device(BUS, device, PROFILE, learned_registers=learned, learned_no_fill=no_fill)
    assert [r.count for r in plan] == counts


def test_learned_no_fill_reads_around_holes() -> None:
    profile = ModbusProfile.model_validate(
        {
            "driver": "modbus",
            "vendor": "T",
            "model": "T",
            "doc": "test",
            "points": {
                "a": {"table": "holding", "address": 0, "type": "u16"},
                "b": {"table": "holding", "address": 5, "type": "u16"},
            },
        }
    )
    device = ModbusDeviceConfig(id="d", driver="modbus", profile="t", bus="b", unit=1)
    assert [r.count for r in plan_device(BUS, device, profile)] == [6]
    assert [r.count for r in plan_device(BUS, device, profile, learned_no_fill=True)] == [1, 1]


@pytest.mark.parametrize(
    ("spec", "value", "shown"),
    [
        ({"type": "i16", "scale": 0.1}, 230.0, "230.0"),
        ({"type": "i16", "scale": 0.1}, 22.999999999999996, "23.0"),
        ({"type": "u16", "scale": 0.01}, 50.2, "50.20"),
        ({"type": "u16", "scale": 0.5}, 3.5, "3.5"),
        ({"type": "u16", "scale": 10}, 2300.0, "2300"),
        ({"type": "u16", "offset": -40.5}, -0.5, "-0.5"),
        ({"type": "u16"}, 103, "103"),
        ({"type": "f32"}, 230.10000610351562, "230.1"),
        ({"type": "f32"}, float("nan"), "nan"),
        ({"type": "bool", "bit": 0}, True, "True"),
    ],
)
def test_values_print_at_their_points_precision(spec: dict[str, object], value: object, shown: str) -> None:
    point = ModbusPoint.model_validate({"table": "holding", "address": 0, **spec})
    assert format_at_precision(value, point) == shown


def test_probe_header_names_table_and_function_code() -> None:
    assert probe_header(7, "input", 30, 4) == "unit 7, input registers (function 04), addresses 30..33"
    assert probe_header(1, "holding", 0, 1) == "unit 1, holding registers (function 03), addresses 0..0"


def converge(true_limit: int, first_read: int) -> tuple[ReadLimit, int, int]:
    """Feed a ReadLimit what a device with ``true_limit`` answers, one planned read per poll, as the scheduler
    does: the first read and each probe larger than the limit are refused, then read in halves."""
    limit = ReadLimit()
    refusals = polls = 0
    size = first_read
    while polls < 50:
        polls += 1
        while size > true_limit:  # refused: halved until answered (the split inside one poll)
            refusals += 1
            limit.saw_refusal(size)
            size = size - size // 2
        limit.saw_answer(size)
        if limit.exact:
            return limit, refusals, polls
        planned = limit.plan_limit()
        assert planned is not None
        size = min(planned, first_read)
    raise AssertionError("did not converge")


@pytest.mark.parametrize("true_limit", [1, 2, 20, 59, 60, 61, 64, 80, 124])
def test_read_limit_converges_to_the_exact_limit_in_a_few_polls(true_limit: int) -> None:
    limit, refusals, polls = converge(true_limit, 125)
    assert limit.proven == true_limit == limit.plan_limit()
    assert polls <= 9 and refusals <= 9, (polls, refusals)  # about log2 of the gap, not one per register


def test_read_limit_learns_nothing_until_something_is_answered() -> None:
    limit = ReadLimit()
    assert limit.plan_limit() is None and not limit.learning
    assert limit.saw_refusal(100)
    assert limit.plan_limit() is None, "refused with nothing answered: not a size problem yet"
    assert not limit.saw_answer(100), "a size at or above a refusal proves nothing"
    assert limit.saw_answer(50)
    assert limit.learning and not limit.exact and limit.plan_limit() == 75


def test_an_inconsistent_device_never_gets_a_plan_above_its_smallest_refusal() -> None:
    limit = ReadLimit()
    limit.saw_refusal(100)
    limit.saw_answer(60)
    limit.saw_refusal(40)  # exception 3 for some other reason on a smaller read
    assert limit.plan_limit() == 39 and limit.proven == 39 and limit.exact
