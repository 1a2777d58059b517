"""What a plan holds per point: a planned point's decoder (built only when asked, for ``modbus read``) decodes what
the request's block decoder decodes, in the profile's order, and reads of the same layout share their compiled
structs instead of each holding its own."""

from __future__ import annotations

import math
import struct
from typing import Any

from drivers.modbus.codec import wire_buffers
from drivers.modbus.config import ModbusPoint
from drivers.modbus.planner import PlanInput, plan_reads


def spec(**fields: Any) -> ModbusPoint:
    return ModbusPoint.model_validate({"table": "holding", **fields})


def meter(device: str) -> list[PlanInput]:
    """Every kind of register point (numbers in several orders, scaled, a bit, a string) and two coils."""
    return [
        (f"{device}.power", spec(address=0, type="f32")),  # the profile's order
        (f"{device}.energy", spec(address=2, type="u32", order="ABCD", scale=0.1)),
        (f"{device}.temp", spec(address=4, type="i16", order="BA", offset=-40)),
        (f"{device}.total", spec(address=6, type="f64", order="DCBA")),
        (f"{device}.alarm", spec(address=10, type="bool", bit=3)),
        (f"{device}.serial", spec(address=11, type="string", length=2)),
        (f"{device}.relay", spec(table="coil", address=0, type="bool")),
        (f"{device}.door", spec(table="coil", address=1, type="bool")),
    ]


def test_a_planned_point_decodes_what_its_block_decodes_in_the_profile_order() -> None:
    requests = plan_reads(1, meter("m1"), max_fill=4, max_fill_bits=16, profile_order="CDAB")
    coils, holding = requests
    assert coils.table == "coil" and coils.block is None
    assert all(p.decoder is None for p in coils.points)  # bits are read as bits[offset], not decoded
    assert holding.block is not None and holding.count == 13
    registers = list(
        struct.unpack(">2H", struct.pack(">f", 230.5))[::-1]  # CDAB: low word first
        + struct.unpack(">2H", struct.pack(">I", 12345))
        + struct.unpack(">H", struct.pack("<h", 25))  # BA
        + (0,)
        + struct.unpack(">4H", struct.pack("<d", math.pi))  # DCBA
        + (0b1000,)
        + struct.unpack(">2H", b"AB\x00\x00")
    )
    wire, swapped = wire_buffers(registers)
    per_point = []
    for planned in holding.points:
        decoder = planned.decoder
        assert decoder is not None
        per_point.append(decoder(wire, swapped))
    assert per_point == holding.block.decode(wire)
    assert dict(zip(holding.point_ids, per_point, strict=True)) == {
        "m1.power": 230.5,
        "m1.energy": 1234.5,
        "m1.temp": -15,
        "m1.total": math.pi,
        "m1.alarm": True,
        "m1.serial": "AB",
    }


def test_reads_of_the_same_layout_share_their_compiled_structs() -> None:
    first = plan_reads(1, meter("m1"), max_fill=4, max_fill_bits=16)[1].block
    second = plan_reads(2, meter("m2"), max_fill=4, max_fill_bits=16)[1].block
    assert first is not None and second is not None
    # one struct per (buffer, endianness) in each read, and the same objects in both: one per format, not per read
    assert len(first._unpackers) == 3  # ABCD, BA (swapped buffer), DCBA
    for (swapped_a, unpack_a), (swapped_b, unpack_b) in zip(first._unpackers, second._unpackers, strict=True):
        assert swapped_a == swapped_b and unpack_a is unpack_b
