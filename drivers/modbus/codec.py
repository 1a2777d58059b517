"""Register codec: Modbus registers <-> typed values, for every type and byte/word order.

Owns the byte-order vocabulary (AB/BA for 16-bit values; ABCD, CDAB, BADC, DCBA for 32/64-bit ones) and the
compiled per-point decoders used on the hot path. Pure: imports no protocol library and does no I/O.

How the four orders are decoded with two buffers and precomputed ``struct`` formats, so no per-value byte
shuffling happens in Python: a read of n registers is packed once big-endian (``>nH``, the bytes as they were on
the wire) and, only when some point needs it, once with each register's bytes swapped (``<nH``). Then

=====  ================================  ================================
order  buffer                            struct endianness
=====  ================================  ================================
ABCD   wire bytes                        big (``>``)
DCBA   wire bytes                        little (``<``): all bytes reversed
BADC   bytes swapped in each register    big
CDAB   bytes swapped in each register    little: registers reversed, each big-endian
=====  ================================  ================================

The same table holds for 64-bit values (CDAB means "low word first"), and for 16-bit values AB = ABCD, BA = BADC.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence

from drivers.modbus.config import TYPE_WIDTH, ModbusPoint

Value = float | int | bool | str

#: struct code of each numeric type
_CODE = {"u16": "H", "i16": "h", "u32": "I", "i32": "i", "u64": "Q", "i64": "q", "f32": "f", "f64": "d"}
#: (uses the byte-swapped buffer, struct endianness) per order
_ORDER_PLAN = {
    "AB": (False, ">"),
    "BA": (True, ">"),
    "ABCD": (False, ">"),
    "DCBA": (False, "<"),
    "BADC": (True, ">"),
    "CDAB": (True, "<"),
}
_INT_RANGE = {
    "u16": (0, 0xFFFF),
    "i16": (-0x8000, 0x7FFF),
    "u32": (0, 0xFFFF_FFFF),
    "i32": (-0x8000_0000, 0x7FFF_FFFF),
    "u64": (0, 0xFFFF_FFFF_FFFF_FFFF),
    "i64": (-0x8000_0000_0000_0000, 0x7FFF_FFFF_FFFF_FFFF),
}
_F32_MAX = 3.4028234663852886e38


class EncodeError(ValueError):
    """A value that the point's type cannot hold (out of range, wrong kind, not finite)."""


def wire_buffers(registers: Sequence[int]) -> tuple[bytes, bytes]:
    """(wire bytes, bytes swapped in each register) of a register list."""
    count = len(registers)
    return struct.pack(f">{count}H", *registers), struct.pack(f"<{count}H", *registers)


#: a compiled decoder: (wire bytes, swapped bytes) -> value
Decoder = Callable[[bytes, bytes], Value]


def compile_decoder(spec: ModbusPoint, register_offset: int, profile_order: str = "ABCD") -> Decoder:
    """Build the decoder of ``spec`` for a point starting ``register_offset`` registers into a read."""
    byte_offset = register_offset * 2
    kind = spec.type
    order = spec.effective_order(profile_order)
    swapped, endian = _ORDER_PLAN[order]
    if kind == "bool":
        mask = 1 << (spec.bit or 0)
        word = struct.Struct(">H").unpack_from
        return lambda wire, _swap: bool(word(wire, byte_offset)[0] & mask)
    if kind == "string":
        end = byte_offset + 2 * (spec.length or 1)

        def decode_string(wire: bytes, swap: bytes) -> str:
            raw = (swap if swapped else wire)[byte_offset:end]
            # Devices pad strings with NULs or spaces; undecodable bytes must not stop the poll.
            return raw.split(b"\x00", 1)[0].decode("utf-8", errors="replace").strip()

        return decode_string
    unpack = struct.Struct(endian + _CODE[kind or "u16"]).unpack_from
    scale, offset = spec.scale, spec.offset
    if swapped:
        if scale == 1 and offset == 0:
            return lambda _wire, swap: unpack(swap, byte_offset)[0]
        return lambda _wire, swap: unpack(swap, byte_offset)[0] * scale + offset
    if scale == 1 and offset == 0:
        return lambda wire, _swap: unpack(wire, byte_offset)[0]
    return lambda wire, _swap: unpack(wire, byte_offset)[0] * scale + offset


def decode(spec: ModbusPoint, registers: Sequence[int], profile_order: str = "ABCD") -> Value:
    """Decode one point from exactly its own registers (tests, ``modbus probe``, write read-back)."""
    if len(registers) < spec.width:
        raise ValueError(f"{spec.type} needs {spec.width} registers, got {len(registers)}")
    wire, swap = wire_buffers(registers)
    return compile_decoder(spec, 0, profile_order)(wire, swap)


def decode_raw(type_name: str, order: str, registers: Sequence[int]) -> float | int:
    """Interpret registers as ``type_name`` in ``order`` with no scaling (``modbus probe`` prints all of these)."""
    swapped, endian = _ORDER_PLAN[order]
    wire, swap = wire_buffers(registers[: TYPE_WIDTH[type_name]])
    value: float | int = struct.unpack_from(endian + _CODE[type_name], swap if swapped else wire, 0)[0]
    return value


def encode(spec: ModbusPoint, value: Value, profile_order: str = "ABCD") -> list[int]:
    """Registers to write for ``value`` (engineering units): the inverse of ``decode``.

    Raises EncodeError when the value does not fit the point's type after scaling; the caller must then refuse
    the write without sending anything.
    """
    kind = spec.type
    if kind in ("bool", "string") or spec.table in ("coil", "discrete"):
        raise EncodeError(f"{kind or spec.table} points are not written as registers")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EncodeError(f"a {kind} point takes a number, not {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise EncodeError(f"{value!r} is not a finite number")
    raw: float | int = (value - spec.offset) / spec.scale if (spec.scale != 1 or spec.offset != 0) else value
    code = _CODE[kind or "u16"]
    if kind in ("f32", "f64"):
        raw = float(raw)
        if kind == "f32" and abs(raw) > _F32_MAX:
            raise EncodeError(f"{value!r} does not fit a 32-bit float")
    else:
        rounded = round(raw)
        if abs(rounded - raw) > 1e-9 * max(1.0, abs(raw)):
            step = spec.scale
            raise EncodeError(f"{value!r} is not a multiple of the register's resolution ({step:g} {spec.unit or ''})")
        low, high = _INT_RANGE[kind or "u16"]
        if not low <= rounded <= high:
            raise EncodeError(f"{value!r} is outside what a {kind} register can hold")
        raw = rounded
    swapped, endian = _ORDER_PLAN[spec.effective_order(profile_order)]
    data = struct.pack(endian + code, raw)
    width = len(data) // 2
    # Undo the buffer choice of the decoder: the swapped buffer is read back as little-endian registers.
    return list(struct.unpack(f"<{width}H" if swapped else f">{width}H", data))


def is_bad_float(value: Value) -> bool:
    """NaN or infinity: what devices send for "no valid reading"; never forwarded as a number."""
    return isinstance(value, float) and not math.isfinite(value)
