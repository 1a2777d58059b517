"""The request planner: the points due together become the fewest reads the register map allows.

Owns ``ReadRequest`` (one read: unit, table, first address, count, the points it carries and the compiled decoder
of the whole block; a point's own decoder is compiled only when asked for), ``plan_reads`` and the human
explanation of a plan. Pure: no I/O, no pymodbus.

Rules (DESIGN.md, "Modbus, the way field engineers need it"): points are merged per unit id and per table; a
read may run through a hole of at most ``max_fill`` unmapped registers (``max_fill_bits`` for coils and discrete
inputs); a read never exceeds 125 registers or 2,000 bits (or the device's own smaller limit). Points are taken
in address order and each read is grown as far as the rules allow, which gives the fewest reads for a given set
of intervals (a read can always start at the first point not yet covered, so greedy growth is optimal).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from drivers.modbus.codec import BlockDecoder, Decoder, compile_decoder
from drivers.modbus.config import (
    BIT_TABLES,
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    ModbusBusConfig,
    ModbusDeviceConfig,
    ModbusPoint,
    ModbusProfile,
)

#: a point to plan: (point id, its spec)
PlanInput = tuple[str, ModbusPoint]


@dataclass(frozen=True, slots=True)
class PlannedPoint:
    point: str
    spec: ModbusPoint
    #: registers (or bits) from the read's first address
    offset: int
    #: the profile's byte and word order (a point's own ``order`` overrides it)
    profile_order: str = "ABCD"

    @property
    def decoder(self) -> Decoder | None:
        """(wire, swapped) -> value; None for coils and discrete inputs, which are read as ``bits[offset]``.

        Compiled on each call, not kept: the poll path decodes a whole read with its request's ``block``, so only
        ``modbus read`` and tests decode point by point, and a closure per point would be held for nothing."""
        if self.spec.table in BIT_TABLES:
            return None
        return compile_decoder(self.spec, self.offset, self.profile_order)


@dataclass(frozen=True, slots=True)
class ReadRequest:
    unit: int
    table: str
    address: int
    count: int
    points: tuple[PlannedPoint, ...]
    #: registers or bits read that no point uses (holes read through)
    fill: int = 0
    #: True when some point decodes from the byte-swapped buffer (so it is built only when needed)
    needs_swapped: bool = field(default=False)
    #: the ids of ``points``, in the same order (the poll path zips them with the decoded values)
    point_ids: tuple[str, ...] = ()
    #: register reads: every point decoded in one go (None for coils and discrete inputs)
    block: BlockDecoder | None = None

    @property
    def end(self) -> int:
        return self.address + self.count - 1

    def describe(self) -> str:
        span = _count(self.count, "bit" if self.table in BIT_TABLES else "register")
        holes = f", {self.fill} fill" if self.fill else ""
        return (
            f"unit {self.unit} {self.table} {self.address}..{self.end} ({span}{holes}) "
            f"-> {_count(len(self.points), 'point')}: {', '.join(p.point.partition('.')[2] for p in self.points)}"
        )


def plan_reads(
    unit: int,
    points: Iterable[PlanInput],
    *,
    max_fill: int,
    max_fill_bits: int,
    max_registers: int = MAX_READ_REGISTERS,
    profile_order: str = "ABCD",
) -> list[ReadRequest]:
    """Merge ``points`` (all of one unit) into reads; returned in table, then address order."""
    by_table: dict[str, list[PlanInput]] = {}
    for item in points:
        by_table.setdefault(item[1].table, []).append(item)
    requests: list[ReadRequest] = []
    for table in ("coil", "discrete", "holding", "input"):
        items = by_table.get(table)
        if not items:
            continue
        bits = table in BIT_TABLES
        limit = MAX_READ_BITS if bits else min(max_registers, MAX_READ_REGISTERS)
        fill = max_fill_bits if bits else max_fill
        items.sort(key=lambda item: (item[1].address, item[0]))
        group: list[PlanInput] = []
        start = end = 0  # end is exclusive
        for item in items:
            spec = item[1]
            item_end = spec.address + spec.width
            if group and spec.address - end <= fill and max(end, item_end) - start <= limit:
                end = max(end, item_end)
                group.append(item)
                continue
            if group:
                requests.append(_request(unit, table, start, end, group, profile_order=profile_order))
            group, start, end = [item], spec.address, item_end
        requests.append(_request(unit, table, start, end, group, profile_order=profile_order))
    return requests


def _request(
    unit: int, table: str, start: int, end: int, group: Sequence[PlanInput], *, profile_order: str
) -> ReadRequest:
    used: set[int] = set()
    planned: list[PlannedPoint] = []
    for point, spec in group:
        offset = spec.address - start
        used.update(range(spec.address, spec.address + spec.width))
        planned.append(PlannedPoint(point, spec, offset, profile_order))
    count = end - start
    block = None if table in BIT_TABLES else BlockDecoder([(p.spec, p.offset) for p in planned], profile_order)
    return ReadRequest(
        unit,
        table,
        start,
        count,
        tuple(planned),
        count - len(used),
        needs_swapped=block is not None and block.needs_swapped,
        point_ids=tuple(p.point for p in planned),
        block=block,
    )


def split_request(request: ReadRequest, profile_order: str) -> tuple[ReadRequest, ReadRequest]:
    """``request`` (of two points or more) as two reads, cut at the middle of its address span (or, when all its
    points sit on one side of it, between its points): what the scheduler tries when a device refuses a
    coalesced read with exception 3 (too many registers) or 2 (a hole it will not read)."""
    if len(request.points) < 2:
        raise ValueError("a read of one point cannot be split")
    middle = request.address + request.count // 2
    items = [(p.point, p.spec) for p in request.points]
    first = [item for item in items if item[1].address < middle]
    if not first or len(first) == len(items):
        first = items[: len(items) // 2]
    rest = items[len(first) :]
    return (
        _request_for(request.unit, request.table, first, profile_order),
        _request_for(request.unit, request.table, rest, profile_order),
    )


def _request_for(unit: int, table: str, items: Sequence[PlanInput], profile_order: str) -> ReadRequest:
    ordered = sorted(items, key=lambda item: (item[1].address, item[0]))
    start = ordered[0][1].address
    end = max(spec.address + spec.width for _point, spec in ordered)
    return _request(unit, table, start, end, ordered, profile_order=profile_order)


def minimum_requests(unit_points: Iterable[tuple[int, Iterable[ModbusPoint]]]) -> int:
    """The theoretical floor: per unit and table, the distinct registers (bits) used divided by the read limit,
    as if every hole could be read through. A plan can only match it when holes are small."""
    total = 0
    for _unit, specs in unit_points:
        used: dict[str, set[int]] = {}
        for spec in specs:
            used.setdefault(spec.table, set()).update(range(spec.address, spec.address + spec.width))
        for table, addresses in used.items():
            limit = MAX_READ_BITS if table in BIT_TABLES else MAX_READ_REGISTERS
            total += math.ceil(len(addresses) / limit)
    return total


def summarize(requests: Sequence[ReadRequest]) -> str:
    """ "3 requests touching 118 registers (4 fill) for 40 points"."""
    registers = sum(r.count for r in requests if r.table not in BIT_TABLES)
    bits = sum(r.count for r in requests if r.table in BIT_TABLES)
    fill = sum(r.fill for r in requests)
    points = sum(len(r.points) for r in requests)
    touched = [_count(registers, "register")] if registers or not bits else []
    if bits:
        touched.append(_count(bits, "bit"))
    what = " and ".join(touched)
    return f"{_count(len(requests), 'request')} touching {what} ({fill} fill) for {_count(points, 'point')}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def device_points(device: ModbusDeviceConfig, profile: ModbusProfile) -> dict[float, list[PlanInput]]:
    """A device's points grouped by poll interval (a point's own ``poll`` overrides the device's)."""
    groups: dict[float, list[PlanInput]] = {}
    for name, spec in profile.points.items():
        groups.setdefault(device.interval_of(spec), []).append((f"{device.id}.{name}", spec))
    return dict(sorted(groups.items()))


def plan_device(
    bus: ModbusBusConfig,
    device: ModbusDeviceConfig,
    profile: ModbusProfile,
    intervals: Iterable[float] | None = None,
    *,
    learned_registers: int | None = None,
    learned_no_fill: bool = False,
) -> list[ReadRequest]:
    """The reads of ``device`` when the points of ``intervals`` (default: all) are due together.

    ``learned_registers`` and ``learned_no_fill`` are what the scheduler learned from the device's refusals in this
    session (exception 3: a smaller read limit; exception 2: no reading through holes); they only ever tighten the
    configured limits."""
    groups = device_points(device, profile)
    wanted = set(groups) if intervals is None else set(intervals)
    points = [item for interval, items in groups.items() if interval in wanted for item in items]
    max_fill = bus.max_fill if profile.max_fill is None else profile.max_fill
    max_fill_bits = bus.max_fill_bits if profile.max_fill is None else min(profile.max_fill * 16, bus.max_fill_bits)
    if learned_no_fill:
        max_fill = max_fill_bits = 0
    limit = configured_max_registers(bus, device, profile)
    if learned_registers is not None:
        limit = min(limit, learned_registers)
    return plan_reads(
        device.unit,
        points,
        max_fill=max_fill,
        max_fill_bits=max_fill_bits,
        max_registers=limit,
        profile_order=profile.order,
    )


def configured_max_registers(bus: ModbusBusConfig, device: ModbusDeviceConfig, profile: ModbusProfile) -> int:
    """The smallest of the limits the site and the profile set: device entry, bus entry, profile (default 125)."""
    limits = [profile.max_registers]
    if bus.max_registers is not None:
        limits.append(bus.max_registers)
    if device.max_registers is not None:
        limits.append(device.max_registers)
    return min(limits)


def format_interval(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}min"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def explain_bus(
    bus: ModbusBusConfig,
    devices: Sequence[tuple[ModbusDeviceConfig, ModbusProfile]],
    *,
    learned: Mapping[str, int] | None = None,
) -> str:
    """The printable plan of one bus: per device, its read limit and where it comes from, the reads when everything
    is due, then per poll interval. ``learned`` (device id -> registers) are limits a device taught the scheduler
    by refusing longer reads (exception 3); the plan is then the one the scheduler uses after learning."""
    learned = learned or {}
    lines = [f"bus {bus.id} ({bus.describe()}, timeout {format_interval(bus.timeout)}, max fill {bus.max_fill})"]
    total = 0
    for device, profile in devices:
        groups = device_points(device, profile)
        taught = learned.get(device.id)
        everything = plan_device(bus, device, profile, learned_registers=taught)
        total += len(everything)
        lines.append(f"  {device.id} unit {device.unit} ({profile.vendor} {profile.model}): {summarize(everything)}")
        lines.append(f"    {describe_limit(bus, device, profile, taught)}")
        lines.extend(f"    {request.describe()}" for request in everything)
        if len(groups) > 1:
            for interval in groups:
                alone = plan_device(bus, device, profile, [interval], learned_registers=taught)
                lines.append(f"    every {format_interval(interval)} alone: {summarize(alone)}")
    lines.append(f"  total when all due: {total} requests")
    return "\n".join(lines)


def describe_limit(
    bus: ModbusBusConfig, device: ModbusDeviceConfig, profile: ModbusProfile, learned: int | None = None
) -> str:
    """ "max 60 registers per read (device)": the limit in force and which setting (or refusal) set it."""
    configured = configured_max_registers(bus, device, profile)
    if learned is not None and learned < configured:
        return f"max {learned} registers per read (learned: the device refused more; configured {configured})"
    if device.max_registers == configured:
        origin = "device"
    elif bus.max_registers == configured:
        origin = "bus"
    elif profile.max_registers < MAX_READ_REGISTERS:
        origin = "profile"
    else:
        origin = "protocol limit; refusals with exception 3 are learned at run time"
    return f"max {configured} registers per read ({origin})"
