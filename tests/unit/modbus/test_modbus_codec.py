"""Table-driven codec tests: (type, order, registers) -> value, for every type and order, and back again."""

from __future__ import annotations

import math
import struct

import pytest

from drivers.modbus.codec import EncodeError, decode, decode_raw, encode
from drivers.modbus.config import ModbusPoint


def point(type_name: str, order: str | None = None, **extra: object) -> ModbusPoint:
    return ModbusPoint.model_validate({"table": "holding", "address": 0, "type": type_name, "order": order, **extra})


# 0x12345678 = 305419896; the registers as a device sends them in each order
U32 = 0x12345678
U64 = 0x0102030405060708
F32_PI = struct.unpack(">I", struct.pack(">f", 3.1415927))[0]  # 0x40490FDB
F64_E = struct.unpack(">Q", struct.pack(">d", math.e))[0]  # 0x4005BF0A8B145769

DECODE_ROWS = [
    # 16-bit
    ("u16", "AB", [0x1234], 0x1234),
    ("u16", "BA", [0x1234], 0x3412),
    ("u16", None, [0xFFFF], 65535),
    ("i16", "AB", [0xFFFF], -1),
    ("i16", "AB", [0x8000], -32768),
    ("i16", "BA", [0x00FF], -256),
    ("i16", "AB", [0x7FFF], 32767),
    # 32-bit in the four orders
    ("u32", "ABCD", [0x1234, 0x5678], U32),
    ("u32", "CDAB", [0x5678, 0x1234], U32),
    ("u32", "BADC", [0x3412, 0x7856], U32),
    ("u32", "DCBA", [0x7856, 0x3412], U32),
    ("i32", "ABCD", [0xFFFF, 0xFFFE], -2),
    ("i32", "CDAB", [0xFFFE, 0xFFFF], -2),
    ("i32", "BADC", [0xFFFF, 0xFEFF], -2),
    ("i32", "DCBA", [0xFEFF, 0xFFFF], -2),
    ("i32", "ABCD", [0x8000, 0x0000], -(2**31)),
    ("f32", "ABCD", [F32_PI >> 16, F32_PI & 0xFFFF], pytest.approx(3.1415927)),
    ("f32", "CDAB", [F32_PI & 0xFFFF, F32_PI >> 16], pytest.approx(3.1415927)),
    ("f32", "BADC", [0x4940, 0xDB0F], pytest.approx(3.1415927)),
    ("f32", "DCBA", [0xDB0F, 0x4940], pytest.approx(3.1415927)),
    ("f32", "ABCD", [0xC2F6, 0xE979], pytest.approx(-123.456, rel=1e-6)),
    ("f32", "ABCD", [0x0000, 0x0000], 0.0),
    ("f32", "ABCD", [0x7F80, 0x0000], math.inf),
    ("f32", "ABCD", [0xFF80, 0x0000], -math.inf),
    # 64-bit in the four orders
    ("u64", "ABCD", [0x0102, 0x0304, 0x0506, 0x0708], U64),
    ("u64", "CDAB", [0x0708, 0x0506, 0x0304, 0x0102], U64),
    ("u64", "BADC", [0x0201, 0x0403, 0x0605, 0x0807], U64),
    ("u64", "DCBA", [0x0807, 0x0605, 0x0403, 0x0201], U64),
    ("u64", "ABCD", [0xFFFF] * 4, 2**64 - 1),
    ("i64", "ABCD", [0xFFFF] * 4, -1),
    ("i64", "CDAB", [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF], -2),
    ("i64", "ABCD", [0x8000, 0, 0, 0], -(2**63)),
    ("i64", "ABCD", [0x0000, 0x0000, 0x0001, 0x0000], 65536),  # energy counters in Wh past 16 bits
    ("f64", "ABCD", [0x4005, 0xBF0A, 0x8B14, 0x5769], pytest.approx(math.e)),
    ("f64", "CDAB", [0x5769, 0x8B14, 0xBF0A, 0x4005], pytest.approx(math.e)),
    ("f64", "BADC", [0x0540, 0x0ABF, 0x148B, 0x6957], pytest.approx(math.e)),
    ("f64", "DCBA", [0x6957, 0x148B, 0x0ABF, 0x0540], pytest.approx(math.e)),
    ("f64", "ABCD", [0xC000, 0, 0, 0], -2.0),
]


@pytest.mark.parametrize(("type_name", "order", "registers", "expected"), DECODE_ROWS)
def test_decode(type_name: str, order: str | None, registers: list[int], expected: object) -> None:
    assert decode(point(type_name, order), registers) == expected


@pytest.mark.parametrize("order", ["ABCD", "CDAB", "BADC", "DCBA"])
@pytest.mark.parametrize("type_name", ["f32", "f64"])
def test_nan_decodes_as_nan_in_every_order(type_name: str, order: str) -> None:
    raw = struct.pack(">f" if type_name == "f32" else ">d", float("nan"))
    abcd = list(struct.unpack(f">{len(raw) // 2}H", raw))
    value = decode(point(type_name, order), _reorder(abcd, order))
    assert isinstance(value, float)
    assert math.isnan(value)


def _reorder(abcd_registers: list[int], order: str) -> list[int]:
    data = struct.pack(f">{len(abcd_registers)}H", *abcd_registers)
    if order == "DCBA":
        data = data[::-1]
    elif order == "BADC":
        data = b"".join(data[i : i + 2][::-1] for i in range(0, len(data), 2))
    elif order == "CDAB":
        data = b"".join(data[i : i + 2] for i in reversed(range(0, len(data), 2)))
    return list(struct.unpack(f">{len(data) // 2}H", data))


def test_reorder_helper_matches_the_table() -> None:
    assert _reorder([0x1234, 0x5678], "CDAB") == [0x5678, 0x1234]
    assert _reorder([0x1234, 0x5678], "BADC") == [0x3412, 0x7856]
    assert _reorder([0x1234, 0x5678], "DCBA") == [0x7856, 0x3412]


@pytest.mark.parametrize(
    ("type_name", "order", "registers", "scale", "offset", "expected"),
    [
        ("i32", "CDAB", [2305, 0], 0.1, 0.0, pytest.approx(230.5)),  # Carlo Gavazzi volts x10, LSW first
        ("u16", "AB", [1234], 0.01, 0.0, pytest.approx(12.34)),
        ("i16", "AB", [0xFF38], 0.1, 0.0, pytest.approx(-20.0)),  # -200 x 0.1
        ("u16", "AB", [500], 0.1, -40.0, pytest.approx(10.0)),  # offset sensors: raw*0.1 - 40
    ],
)
def test_scale_and_offset(
    type_name: str, order: str, registers: list[int], scale: float, offset: float, expected: object
) -> None:
    assert decode(point(type_name, order, scale=scale, offset=offset), registers) == expected


@pytest.mark.parametrize(("bit", "expected"), [(0, True), (1, False), (2, True), (15, True), (14, False)])
def test_bit_of_register(bit: int, expected: bool) -> None:
    assert decode(point("bool", bit=bit), [0b1000_0000_0000_0101]) is expected


@pytest.mark.parametrize(
    ("order", "registers", "expected"),
    [
        ("AB", [0x5344, 0x4D36, 0x3330, 0x0000], "SDM630"),
        ("BA", [0x4453, 0x364D, 0x3033, 0x2020], "SDM630"),
        ("AB", [0x4142, 0x4320, 0x2020, 0x2020], "ABC"),
    ],
)
def test_string(order: str, registers: list[int], expected: str) -> None:
    assert decode(point("string", order, length=4), registers) == expected


ENCODE_ROUND_TRIP = [
    ("u16", "AB", 65535),
    ("u16", "BA", 0x1234),
    ("i16", "AB", -32768),
    ("u32", "CDAB", 4_000_000_000),
    ("i32", "BADC", -123_456_789),
    ("i32", "DCBA", 7),
    ("u64", "CDAB", 2**64 - 1),
    ("i64", "DCBA", -(2**63)),
    ("f32", "ABCD", -123.5),
    ("f32", "CDAB", 1e-3),
    ("f64", "BADC", math.pi),
    ("f64", "DCBA", -1e300),
]


@pytest.mark.parametrize(("type_name", "order", "value"), ENCODE_ROUND_TRIP)
def test_encode_round_trips(type_name: str, order: str, value: float) -> None:
    spec = point(type_name, order)
    registers = encode(spec, value)
    assert all(0 <= r <= 0xFFFF for r in registers)
    assert len(registers) == spec.width
    assert decode(spec, registers) == pytest.approx(value, rel=1e-6)


def test_encode_matches_the_documented_layout() -> None:
    assert encode(point("u32", "CDAB"), U32) == [0x5678, 0x1234]
    assert encode(point("u32", "BADC"), U32) == [0x3412, 0x7856]
    assert encode(point("i16", "AB", scale=0.1), 50.0) == [500]


@pytest.mark.parametrize(
    ("spec", "value", "message"),
    [
        (point("u16"), -1, "outside what a u16"),
        (point("u16"), 65536, "outside what a u16"),
        (point("i16", scale=0.1), 3276.8, "outside what a i16"),
        (point("i16", scale=0.1), 1.25, "multiple of the register's resolution"),
        (point("f32"), 1e39, "does not fit a 32-bit float"),
        (point("f32"), float("nan"), "not a finite number"),
        (point("u16"), True, "takes a number"),
        (point("u16"), "12", "takes a number"),
    ],
)
def test_encode_refuses_what_does_not_fit(spec: ModbusPoint, value: object, message: str) -> None:
    with pytest.raises(EncodeError, match=message):
        encode(spec, value)  # type: ignore[arg-type]


def test_decode_raw_gives_all_probe_interpretations() -> None:
    assert decode_raw("u32", "CDAB", [0x5678, 0x1234]) == U32
    assert decode_raw("f64", "ABCD", [0x4005, 0xBF0A, 0x8B14, 0x5769]) == pytest.approx(math.e)
    assert decode(point("u64", "ABCD"), [0, 0, 0, 1]) == 1
    with pytest.raises(ValueError, match="needs 4 registers"):
        decode(point("u64", "ABCD"), [0, 0])
    assert F64_E == 0x4005BF0A8B145769
