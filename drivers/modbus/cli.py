"""``edge-gateway modbus probe|read|plan``: the on-site tools of the Modbus driver.

Owns argument parsing and printing for these three commands. ``plan`` needs no device and imports no pymodbus;
``probe`` and ``read`` talk to a device through ``drivers.modbus.client.ModbusLink`` (imported when they run).

Exit codes: 0 ok, 1 bad input (config error, unknown profile), 2 a usage error (a bad ``--tcp``, count or address:
argparse's one line), 3 the device could not be read, 130 Ctrl-C (``gateway.cli``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

from drivers.modbus.codec import decode_raw, wire_buffers
from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig, ModbusPoint, ModbusProfile
from drivers.modbus.planner import explain_bus, plan_device, split_request
from gateway.arguments import duration, host_port, int_range
from gateway.driver_api import print_site_plans
from gateway.errors import ConfigError, DeviceError, DeviceRejected
from gateway.http.page import format_reading, format_unit
from gateway.model import Sample

_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")


def register(subparsers: Any) -> None:
    modbus = subparsers.add_parser("modbus", help="Modbus tools: probe registers, read a profile, print the plan")
    sub = modbus.add_subparsers(dest="modbus_command", metavar="COMMAND", required=True)

    probe = sub.add_parser(
        "probe",
        help="read raw registers (--table holding or input) and print every 16/32/64-bit interpretation",
        description=(
            "Read raw registers and print every 16/32/64-bit interpretation side by side. Choose the table with "
            "--table: holding (function 03, the default) or input (function 04). Most meters keep their "
            "measurements in input registers: probing the holding table of such a meter shows zeros or an "
            "exception, not a wrong reading. The first line of the output names the table and function code."
        ),
    )
    probe.add_argument(
        "--table",
        choices=["holding", "input"],
        default="holding",
        help="register table to read: holding (function 03, default) or input (function 04, most meter readings)",
    )
    _connection_args(probe)
    probe.add_argument(
        "--address", type=int_range(0, 65535), required=True, help="0-based protocol address (register 40001 = 0)"
    )
    probe.add_argument("--count", type=int_range(1, 125), default=4, help="registers to read (1-125)")
    probe.set_defaults(handler=_probe, usage=probe)

    read = sub.add_parser("read", help="read every point of a device profile and print it with units")
    _connection_args(read)
    read.add_argument("--profile", required=True, help="profile name (firmware_configs/devices/NAME.yaml) or path")
    read.set_defaults(handler=_read)

    plan = sub.add_parser("plan", help="print the request plan of every Modbus bus of a site file")
    plan.add_argument("site", type=Path, help="site file (YAML)")
    plan.add_argument(
        "--probe",
        action="store_true",
        help="poll every device first (until the read limits devices teach by refusing long reads with exception 3 "
        "are exact) and print the plan with those limits, and each device's state and failed reads",
    )
    plan.add_argument(
        "--seconds", type=duration, default=10.0, help="with --probe: how long to wait for every device (default 10s)"
    )
    plan.set_defaults(handler=_plan)


def _connection_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--tcp", type=host_port(502), metavar="HOST:PORT", help="Modbus TCP endpoint (port defaults to 502)"
    )
    where.add_argument("--serial", metavar="DEV", help="serial device for Modbus RTU, e.g. /dev/ttyUSB0")
    parser.add_argument("--baud", type=int_range(50, 4_000_000), default=9600)
    parser.add_argument("--parity", choices=["N", "E", "O"], default="N")
    parser.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    parser.add_argument("--unit", type=int_range(1, 255), required=True, help="slave address / unit id (1-255)")
    parser.add_argument(
        "--timeout", type=duration, default=1.0, help="how long to wait for an answer (default 1s; 500ms, 2s)"
    )


def _bus(args: argparse.Namespace) -> ModbusBusConfig:
    if args.tcp:
        host, port = args.tcp
        return ModbusBusConfig.model_validate(
            {"id": "cli", "type": "tcp", "host": host, "port": port, "timeout": args.timeout, "retries": 0}
        )
    return ModbusBusConfig.model_validate(
        {
            "id": "cli",
            "type": "rtu",
            "serial": args.serial,
            "baudrate": args.baud,
            "parity": args.parity,
            "stopbits": args.stopbits,
            "timeout": args.timeout,
            "retries": 0,
        }
    )


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


# ---------------------------------------------------------------- probe


def _probe(args: argparse.Namespace) -> int:
    if args.address + args.count > 65536:
        args.usage.error(f"--address {args.address} --count {args.count} runs past address 65535")  # exits 2
    try:
        bus = _bus(args)
        registers = asyncio.run(_read_registers(bus, args.table, args.unit, args.address, args.count))
    except (ValueError, ConfigError) as exc:
        return _fail(str(exc), 1)
    except DeviceError as exc:
        return _fail(str(exc), 3)
    print(probe_header(args.unit, args.table, args.address, len(registers)))
    print(format_probe(args.address, registers))
    return 0


#: the read function code of each register table (Modbus application protocol v1.1b3, 6.3 and 6.4)
FUNCTION_CODES = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}


def probe_header(unit: int, table: str, address: int, count: int) -> str:
    """ "unit 1, input registers (function 04), addresses 100..103": what was read, so zeros from the wrong table
    are not taken for a reading."""
    return (
        f"unit {unit}, {table} registers (function {FUNCTION_CODES[table]:02d}), "
        f"addresses {address}..{address + count - 1}"
    )


async def _read_registers(bus: ModbusBusConfig, table: str, unit: int, address: int, count: int) -> list[int]:
    from drivers.modbus.client import ModbusLink

    async with ModbusLink(bus) as link:
        return await link.read_registers(table, unit, address, count)


def format_probe(address: int, registers: list[int]) -> str:
    """Registers and every interpretation, side by side, so a wrong word order shows at a glance."""
    lines = ["16-bit", f"{'address':>8}  {'hex':>6}  {'u16':>6}  {'i16':>6}  {'BA u16':>6}  ascii"]
    wire, _swap = wire_buffers(registers)
    for index, register in enumerate(registers):
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in wire[index * 2 : index * 2 + 2])
        lines.append(
            f"{address + index:>8}  0x{register:04X}  {register:>6}  {decode_raw('i16', 'AB', [register]):>6}  "
            f"{decode_raw('u16', 'BA', [register]):>6}  {text}"
        )
    for width, types in ((2, ("u32", "i32", "f32")), (4, ("u64", "i64", "f64"))):
        if len(registers) < width:
            continue
        lines.append("")
        lines.append(f"{width * 16}-bit (value starting at each address, in the four orders)")
        lines.append(f"{'address':>8}  {'type':<4}  " + "  ".join(f"{order:>24}" for order in _ORDERS))
        for index in range(len(registers) - width + 1):
            chunk = registers[index : index + width]
            for type_name in types:
                cells = [_cell(decode_raw(type_name, order, chunk)) for order in _ORDERS]
                lines.append(f"{address + index:>8}  {type_name:<4}  " + "  ".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def _cell(value: float | int) -> str:
    if isinstance(value, float):
        return f"{value:.7g}"
    return str(value)


# ---------------------------------------------------------------- read


def _read(args: argparse.Namespace) -> int:
    from gateway.config.site import FIRMWARE_CONFIGS, load_profile

    candidate = Path(args.profile)
    try:
        if candidate.suffix in (".yaml", ".yml"):
            profile = load_profile(candidate.stem, ModbusProfile, [candidate.parent])
        else:
            profile = load_profile(args.profile, ModbusProfile, [FIRMWARE_CONFIGS / "devices"])
        bus = _bus(args)
    except FileNotFoundError:
        return _fail(f"profile {args.profile!r} not found", 1)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except ValueError as exc:
        return _fail(str(exc), 1)
    assert isinstance(profile, ModbusProfile)
    device = ModbusDeviceConfig.model_validate(
        {"id": "device", "driver": "modbus", "profile": args.profile, "bus": "cli", "unit": args.unit}
    )
    try:
        rows = asyncio.run(_read_profile(bus, device, profile))
    except DeviceError as exc:
        return _fail(str(exc), 3)
    width = max(len(name) for name, *_ in rows)
    failed = 0
    for name, value, unit, error in rows:
        if error is not None:
            failed += 1
            print(f"{name:<{width}}  BAD  {error}")
        else:
            shown = format_unit(unit)
            print(f"{name:<{width}}  {format_at_precision(value, profile.points[name])}{' ' + shown if shown else ''}")
    if failed == len(rows):
        return _fail(f"unit {args.unit} answered none of the {len(rows)} points' reads", 3)
    if failed:
        print(f"warning: {failed} of {len(rows)} points not read (BAD above)", file=sys.stderr)
    return 0


def format_at_precision(value: object, spec: ModbusPoint) -> str:
    """A value at its point's precision: a register scaled by 0.1 prints one decimal (``230.0``, not ``230``
    nor ``229.99999999999997``), an integer as is, a float register to 6 significant digits."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if spec.type in ("f32", "f64") or not isinstance(value, float) or not math.isfinite(value):
        return format_reading(value)
    decimals = max(_decimals(spec.scale), _decimals(spec.offset))
    return f"{value:.{decimals}f}"


def _decimals(number: float) -> int:
    exponent = Decimal(repr(number)).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


async def _read_profile(
    bus: ModbusBusConfig, device: ModbusDeviceConfig, profile: ModbusProfile
) -> list[tuple[str, object, str, str | None]]:
    from drivers.modbus.client import ModbusLink

    rows: list[tuple[str, object, str, str | None]] = []
    async with ModbusLink(bus) as link:
        pending = list(plan_device(bus, device, profile))
        while pending:
            request = pending.pop(0)
            try:
                if request.table in ("coil", "discrete"):
                    bits = await link.read_bits(request.table, request.unit, request.address, request.count)
                    rows.extend((p.point, bits[p.offset], "", None) for p in request.points)
                    continue
                registers = await link.read_registers(request.table, request.unit, request.address, request.count)
            except DeviceRejected as exc:
                if exc.code in (2, 3) and len(request.points) > 1:
                    # as the scheduler does: a meter that refuses long reads (or holes) is read in halves
                    pending[:0] = split_request(request, profile.order)
                    continue
                rows.extend((p.point, None, "", str(exc)) for p in request.points)
                continue
            except DeviceError as exc:
                rows.extend((p.point, None, "", str(exc)) for p in request.points)
                continue
            wire, swap = wire_buffers(registers)
            for planned in request.points:
                assert planned.decoder is not None
                rows.append((planned.point, planned.decoder(wire, swap), planned.spec.unit or "", None))
    order = {f"{device.id}.{name}": index for index, name in enumerate(profile.points)}
    rows.sort(key=lambda row: order[row[0]])
    return [(point.partition(".")[2], value, unit, error) for point, value, unit, error in rows]


# ---------------------------------------------------------------- plan


def _plan(args: argparse.Namespace) -> int:
    from drivers.modbus.source import bus_devices
    from gateway.config.site import load_site

    def explain(bus: ModbusBusConfig, devices: list[tuple[ModbusDeviceConfig, ModbusProfile]]) -> str:
        if not args.probe or not devices:
            return explain_bus(bus, devices)
        learned, report = asyncio.run(_probe_bus(bus, devices, args.seconds))
        return "\n".join([explain_bus(bus, devices, learned=learned), *report])

    return print_site_plans(args.site, load_site, "modbus_buses", bus_devices, explain)


async def _probe_bus(
    bus: ModbusBusConfig, devices: list[tuple[ModbusDeviceConfig, ModbusProfile]], seconds: float
) -> tuple[dict[str, int], list[str]]:
    """Run the bus's real scheduler until every device has been polled and every read limit a device taught is
    exact (or ``seconds`` pass): what the devices taught it and each one's state, as the gateway would see them."""
    from drivers.modbus.source import ModbusBusSource

    source = ModbusBusSource(bus, devices)
    polled: set[str] = set()
    everyone = {device.id for device, _profile in devices}
    stopping = asyncio.Event()

    async def publish(batch: list[Sample]) -> None:
        polled.update(sample.point.partition(".")[0] for sample in batch)
        if polled >= everyone and not source.learning_limits():
            stopping.set()  # every device polled, and every limit a device taught is exact

    task = asyncio.create_task(source.run(publish, stopping))
    try:
        await asyncio.wait_for(stopping.wait(), timeout=seconds)
    except TimeoutError:
        stopping.set()
    await task
    report = [f"  probed: {len(polled)} of {len(everyone)} devices polled"]
    for status in source.status():
        failures = ", ".join(f"{reason} {count}" for reason, count in sorted(status.failures.items())) or "none"
        line = f"    {status.device}: {status.state}; failed reads: {failures}"
        report.append(line + (f"; last error: {status.last_error}" if status.last_error else ""))
    return source.learned_limits(), report
