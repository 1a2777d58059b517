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

On the poll path a whole read is decoded by a ``BlockDecoder`` compiled once per planned request: the numeric
points that share a (buffer, endianness) pair are unpacked by one precompiled ``struct`` whose format skips the
holes with pad bytes, so 50 points cost one C call instead of 50 Python calls. Bits of a register and strings
keep their per-point decoders; numeric points get one only when asked (``modbus read``, tests). A compiled
``struct`` is shared by every decoder with the same format (one per type and endianness, one per read layout),
not held per point: at 5,000 points that was 1.2 MiB of identical ``Struct`` objects.
"""

from __future__ import annotations

import math
import struct
from array import array
from collections.abc import Callable, Sequence
from functools import lru_cache
from operator import itemgetter
from typing import Any

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


#: ``struct.Struct(fmt).unpack_from``: (buffer, byte offset) -> values
Unpacker = Callable[..., tuple[Any, ...]]


@lru_cache(maxsize=1024)  # formats come from the config (types, orders, read layouts); bounded all the same
def unpacker(fmt: str) -> Unpacker:
    """The ``unpack_from`` of the one compiled ``struct`` of ``fmt`` (shared: a ``Struct`` is immutable)."""
    return struct.Struct(fmt).unpack_from


class EncodeError(ValueError):
    """A value that the point's type cannot hold (out of range, wrong kind, not finite)."""


def wire_buffers(registers: Sequence[int]) -> tuple[bytes, bytes]:
    """(wire bytes, bytes swapped in each register) of a register list."""
    count = len(registers)
    return struct.pack(f">{count}H", *registers), struct.pack(f"<{count}H", *registers)


def swap_register_bytes(wire: bytes) -> bytes:
    """The bytes of each register swapped (the second buffer of the table above), without making an int per
    register."""
    words = array("H")
    words.frombytes(wire)
    words.byteswap()
    return words.tobytes()


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
        word = unpacker(">H")
        return lambda wire, _swap: bool(word(wire, byte_offset)[0] & mask)
    if kind == "string":
        end = byte_offset + 2 * (spec.length or 1)

        def decode_string(wire: bytes, swap: bytes) -> str:
            raw = (swap if swapped else wire)[byte_offset:end]
            # Devices pad strings with NULs or spaces; undecodable bytes must not stop the poll.
            return raw.split(b"\x00", 1)[0].decode("utf-8", errors="replace").strip()

        return decode_string
    unpack = unpacker(endian + _CODE[kind or "u16"])
    scale, offset = spec.scale, spec.offset
    if swapped:
        if scale == 1 and offset == 0:
            return lambda _wire, swap: unpack(swap, byte_offset)[0]
        return lambda _wire, swap: unpack(swap, byte_offset)[0] * scale + offset
    if scale == 1 and offset == 0:
        return lambda wire, _swap: unpack(wire, byte_offset)[0]
    return lambda wire, _swap: unpack(wire, byte_offset)[0] * scale + offset


class BlockDecoder:
    """Every point of one register read, decoded at once: ``decode(wire)`` returns their values in the order the
    points were given. Compiled once per planned request; the result is exactly what each point's own
    ``compile_decoder`` gives (a property test holds the two together).

    ``float_positions`` lists the f32/f64 values, which the caller checks for NaN/infinity (a device's "no valid
    reading"), so integers are never checked.
    """

    __slots__ = ("_extra", "_reorder", "_scaled", "_unpackers", "float_positions", "needs_swapped", "size")

    def __init__(self, points: Sequence[tuple[ModbusPoint, int]], profile_order: str = "ABCD") -> None:
        """``points``: (spec, register offset into the read) of each point, in the order values are returned."""
        groups: dict[tuple[bool, str], list[tuple[int, int, ModbusPoint]]] = {}
        extra: list[tuple[int, Decoder]] = []
        scaled: list[tuple[int, float, float]] = []
        floats: list[int] = []
        needs_swapped = False
        for position, (spec, register_offset) in enumerate(points):
            swapped, endian = _ORDER_PLAN[spec.effective_order(profile_order)]
            needs_swapped = needs_swapped or swapped
            if (spec.type or "u16") in _CODE:
                groups.setdefault((swapped, endian), []).append((register_offset * 2, position, spec))
            else:  # a bit of a register, or a string: its own decoder
                extra.append((position, compile_decoder(spec, register_offset, profile_order)))
        # One struct per (buffer, endianness): points in address order, the holes between them as pad bytes ("x").
        unpackers: list[tuple[bool, Unpacker]] = []
        order_of_values: list[int] = []
        for (swapped, endian), members in groups.items():
            members.sort(key=lambda member: member[:2])
            layout, cursor = [endian], 0
            for byte_offset, position, spec in members:
                if byte_offset < cursor:  # overlapping points (the config refuses them): decode this one alone
                    extra.append((position, compile_decoder(spec, byte_offset // 2, profile_order)))
                    continue
                code = _CODE[spec.type or "u16"]
                layout.append("x" * (byte_offset - cursor) + code)
                cursor = byte_offset + struct.calcsize(endian + code)
                order_of_values.append(position)
                if spec.scale != 1 or spec.offset != 0:
                    scaled.append((position, spec.scale, spec.offset))
                if code in "fd":
                    floats.append(position)
            unpackers.append((swapped, unpacker("".join(layout))))
        order_of_values.extend(position for position, _decoder in extra)
        self.size = len(points)
        self._unpackers = tuple(unpackers)
        self._extra = tuple(decoder for _position, decoder in extra)
        # values come out grouped by struct; ``_reorder`` puts them back in the caller's order (None: already are)
        where = {position: index for index, position in enumerate(order_of_values)}
        permutation = [where[position] for position in range(self.size)]
        # (a single point is always in order, so itemgetter here always picks two or more and returns a tuple)
        self._reorder = itemgetter(*permutation) if permutation != list(range(self.size)) else None
        self._scaled = tuple(scaled)
        self.float_positions = tuple(sorted(floats))
        self.needs_swapped = needs_swapped

    def decode(self, wire: bytes) -> list[Value]:
        """The values of the points from the read's wire bytes (``2 * count`` bytes, as received)."""
        swapped = swap_register_bytes(wire) if self.needs_swapped else b""
        values: list[Value] = []
        for uses_swapped, unpack in self._unpackers:
            values.extend(unpack(swapped if uses_swapped else wire))
        values.extend([decoder(wire, swapped) for decoder in self._extra])
        if self._reorder is not None:
            values = list(self._reorder(values))
        for position, scale, offset in self._scaled:
            values[position] = values[position] * scale + offset  # type: ignore[operator]  # numeric by construction
        return values


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
