"""The block decoder of the poll path against the per-point decoders it replaces, and the poll path around it.

``BlockDecoder`` unpacks a whole read with one struct per (buffer, endianness); ``compile_decoder`` is the
per-point reference (itself pinned by the table-driven rows of ``test_modbus_codec.py``). A hypothesis property
holds the two equal for random register maps (every type and order, holes, bits of a register, strings, scale and
offset) and random register contents, NaN included. The scheduler tests then poll through an injected link and
check what reaches the sink: values in point order, scaling, and NaN/infinity published as BAD, never as numbers.
"""

from __future__ import annotations

import asyncio
import math
import struct
from types import TracebackType
from typing import Any, Self

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus.codec import BlockDecoder, compile_decoder, swap_register_bytes, wire_buffers
from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig, ModbusPoint, ModbusProfile
from drivers.modbus.source import ModbusBusSource
from gateway.model import Quality, Sample

WIDE_ORDERS = ["ABCD", "CDAB", "BADC", "DCBA"]
TYPES = {"u16": 1, "i16": 1, "u32": 2, "i32": 2, "f32": 2, "u64": 4, "i64": 4, "f64": 4}


@st.composite
def register_maps(draw: st.DrawFn) -> tuple[list[tuple[ModbusPoint, int]], str]:
    """Points laid out one after another with random holes; (spec, register offset) pairs in shuffled order."""
    profile_order = draw(st.sampled_from(WIDE_ORDERS))
    points: list[tuple[ModbusPoint, int]] = []
    offset = draw(st.integers(0, 3))
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from([*TYPES, "bool", "string"]))
        fields: dict[str, Any] = {"table": "holding", "address": offset, "type": kind}
        if kind == "bool":
            fields["bit"] = draw(st.integers(0, 15))
            width = 1
        elif kind == "string":
            fields["length"] = width = draw(st.integers(1, 4))
            fields["order"] = draw(st.sampled_from(["AB", "BA"]))
        else:
            width = TYPES[kind]
            choices: list[str | None] = [None, "AB", "BA"] if width == 1 else [None, *WIDE_ORDERS]
            fields["order"] = draw(st.sampled_from(choices))
            if draw(st.booleans()):
                fields["scale"] = draw(st.sampled_from([0.1, 0.01, 10.0, -1.0]))
                fields["offset"] = draw(st.sampled_from([0.0, -40.0, 2.5]))
        points.append((ModbusPoint.model_validate(fields), offset))
        offset += width + draw(st.integers(0, 3))
    return draw(st.permutations(points)), profile_order


def _same(left: object, right: object) -> bool:
    if isinstance(left, float) and isinstance(right, float) and math.isnan(left):
        return math.isnan(right)
    return left == right and type(left) is type(right)


@settings(max_examples=150, deadline=None)
@given(register_maps(), st.data())
def test_block_decoder_gives_what_each_point_decoder_gives(
    layout: tuple[list[tuple[ModbusPoint, int]], str], data: st.DataObject
) -> None:
    points, profile_order = layout
    size = max(offset + spec.width for spec, offset in points)
    registers = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=size, max_size=size))
    wire, swapped = wire_buffers(registers)
    expected = [compile_decoder(spec, offset, profile_order)(wire, swapped) for spec, offset in points]
    block = BlockDecoder(points, profile_order)
    got = block.decode(wire)
    assert len(got) == len(expected)
    assert all(_same(g, e) for g, e in zip(got, expected, strict=True)), (got, expected)
    floats = {i for i, (spec, _offset) in enumerate(points) if spec.type in ("f32", "f64")}
    assert set(block.float_positions) == floats


def test_swap_register_bytes_swaps_within_each_register_only() -> None:
    assert swap_register_bytes(bytes([1, 2, 3, 4, 5, 6])) == bytes([2, 1, 4, 3, 6, 5])
    assert swap_register_bytes(b"") == b""


def test_overlapping_points_are_still_decoded_one_by_one() -> None:
    # the config refuses overlaps; a decoder built by hand from overlapping specs must still be right
    whole = ModbusPoint.model_validate({"table": "holding", "address": 0, "type": "u32"})
    high = ModbusPoint.model_validate({"table": "holding", "address": 0, "type": "u16", "scale": 2})
    block = BlockDecoder([(whole, 0), (high, 0)])
    assert block.decode(struct.pack(">HH", 0x0001, 0x0002)) == [0x00010002, 2]


# ------------------------------------------------------------------ the poll path, through an injected link

PROFILE = ModbusProfile.model_validate(
    {
        "driver": "modbus",
        "vendor": "T",
        "model": "T",
        "doc": "test",
        "order": "CDAB",
        "points": {
            "power": {"table": "holding", "address": 0, "type": "f32"},
            "energy": {"table": "holding", "address": 2, "type": "u32"},
            "temp": {"table": "holding", "address": 5, "type": "i16", "scale": 0.1, "offset": -40},
            "alarm": {"table": "holding", "address": 6, "type": "bool", "bit": 3},
            "volts": {"table": "holding", "address": 7, "type": "f64", "order": "ABCD"},
        },
    }
)


class ScriptedLink:
    """Answers register reads from a fixed register image; records what was asked."""

    def __init__(self, registers: list[int]) -> None:
        self.image = struct.pack(f">{len(registers)}H", *registers)
        self.reads: list[tuple[str, int, int, int]] = []

    @property
    def connected(self) -> bool:
        return True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def read_register_bytes(self, table: str, unit: int, address: int, count: int) -> bytes:
        self.reads.append((table, unit, address, count))
        return self.image[2 * address : 2 * (address + count)]

    async def read_registers(self, table: str, unit: int, address: int, count: int) -> list[int]:
        raw = await self.read_register_bytes(table, unit, address, count)
        return list(struct.unpack(f">{count}H", raw))

    async def read_bits(self, table: str, unit: int, address: int, count: int) -> list[bool]:
        raise AssertionError("no bit table in this profile")

    async def write_registers(self, unit: int, address: int, values: list[int]) -> None:
        raise AssertionError("no writes here")

    async def write_coil(self, unit: int, address: int, value: bool) -> None:
        raise AssertionError("no writes here")


def _cdab(fmt: str, value: float | int) -> list[int]:
    words = struct.unpack(f">{struct.calcsize(fmt) // 2}H", struct.pack(">" + fmt, value))
    return list(reversed(words))


async def _poll_once(registers: list[int]) -> tuple[list[Sample], ScriptedLink]:
    bus = ModbusBusConfig.model_validate({"id": "b", "type": "tcp", "host": "127.0.0.1", "max_fill": 4})
    device = ModbusDeviceConfig(id="meter", driver="modbus", profile="t", bus="b", unit=7)
    link = ScriptedLink(registers)
    source = ModbusBusSource(bus, [(device, PROFILE)], link_factory=lambda _bus: link)
    stopping = asyncio.Event()
    batches: list[list[Sample]] = []

    async def publish(batch: list[Sample]) -> None:
        batches.append(batch)
        stopping.set()

    await asyncio.wait_for(source.run(publish, stopping), timeout=5)
    assert len(batches) == 1
    return batches[0], link


def _image(power: float, volts: float) -> list[int]:
    return [
        *_cdab("f", power),
        *_cdab("I", 123_456_789),
        0xBEEF,  # a hole the planner reads through
        650,  # 650 * 0.1 - 40 = 25.0
        0b1000,
        *struct.unpack(">4H", struct.pack(">d", volts)),
    ]


async def test_one_read_decodes_every_point_in_order_with_scaling() -> None:
    samples, link = await _poll_once(_image(1.5, 230.25))
    assert link.reads == [("holding", 7, 0, 11)]
    assert [s.point for s in samples] == ["meter.power", "meter.energy", "meter.temp", "meter.alarm", "meter.volts"]
    assert all(type(s) is Sample and s.quality is Quality.GOOD for s in samples)
    values = {s.point: s.value for s in samples}
    assert values == {
        "meter.power": 1.5,
        "meter.energy": 123_456_789,
        "meter.temp": pytest.approx(25.0),
        "meter.alarm": True,
        "meter.volts": 230.25,
    }
    assert len({s.ts for s in samples}) == 1  # one read, one timestamp


@pytest.mark.parametrize(("power", "volts"), [(math.nan, 1.0), (1.0, math.inf), (-math.inf, math.nan)])
async def test_nan_and_infinity_are_published_bad_the_rest_good(power: float, volts: float) -> None:
    samples, _link = await _poll_once(_image(power, volts))
    by_point = {s.point: s for s in samples}
    for name, value in (("meter.power", power), ("meter.volts", volts)):
        if math.isfinite(value):
            assert by_point[name] == Sample(name, value, by_point[name].ts, Quality.GOOD)
        else:
            assert by_point[name].value is None
            assert by_point[name].quality is Quality.BAD
    assert by_point["meter.energy"].value == 123_456_789
    assert by_point["meter.energy"].quality is Quality.GOOD
    # the slow path keeps point order too
    assert [s.point for s in samples] == ["meter.power", "meter.energy", "meter.temp", "meter.alarm", "meter.volts"]


def test_register_responses_keep_the_wire_bytes_and_refuse_a_byte_count_beyond_the_frame() -> None:
    from pymodbus.exceptions import ModbusIOException

    from drivers.modbus.client import _HoldingBytesResponse, _InputBytesResponse

    response = _InputBytesResponse()
    response.decode(bytes([4, 0x12, 0x34, 0xAB, 0xCD]))
    assert response.raw == bytes([0x12, 0x34, 0xAB, 0xCD])
    assert response.function_code == 4
    assert "4 bytes" in str(response)
    with pytest.raises(ModbusIOException, match="byte_count 6"):
        _HoldingBytesResponse().decode(bytes([6, 0, 1, 0, 2]))
