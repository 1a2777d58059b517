"""``edge-gateway bacnet discover|read|plan``: the on-site tools of the BACnet/IP driver.

Owns argument parsing and printing for these commands. ``plan`` needs no device and imports no bacpypes3;
``discover`` and ``read`` talk to devices through ``drivers.bacnet.client.BacnetLink`` (imported when they run).

Exit codes: 0 ok, 1 bad input (config error, bad object), 2 usage error, 3 the device could not be read or found.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import re
import sys
from pathlib import Path
from typing import Any

from drivers.bacnet.client import BacnetRefused
from drivers.bacnet.config import (
    ENGINEERING_UNITS,
    BacnetDeviceConfig,
    BacnetNetworkConfig,
    BacnetProfile,
    ObjectId,
    ObjectType,
    parse_object_id,
)
from drivers.bacnet.planner import PlannedPoint, answer_budget, describe_plan, plan_reads
from gateway.arguments import duration
from gateway.driver_api import print_site_plans
from gateway.errors import ConfigError, DeviceError

#: object types discover turns into points (the rest of an object list: schedules, calendars, programs, ...)
_POINT_TYPES = frozenset(ObjectType.__args__) - {"device"}  # type: ignore[attr-defined]


def register(subparsers: Any) -> None:
    bacnet = subparsers.add_parser("bacnet", help="BACnet/IP tools: discover devices, read a property, print the plan")
    sub = bacnet.add_subparsers(dest="bacnet_command", metavar="COMMAND", required=True)

    discover = sub.add_parser(
        "discover", help="Who-Is / I-Am, then each device's objects, names and units, as a profile snippet"
    )
    where = discover.add_mutually_exclusive_group()
    where.add_argument("--network", metavar="CIDR", help="send the Who-Is to this network's broadcast address")
    where.add_argument("--address", metavar="A", help="send the Who-Is to one device (a.b.c.d[:port])")
    discover.add_argument("--seconds", type=duration, default=3.0, help="how long to collect I-Ams (default 3s)")
    _local(discover)
    discover.set_defaults(handler=_discover)

    read = sub.add_parser("read", help="read one property of one object")
    read.add_argument("--address", required=True, metavar="A", help="the device's address, a.b.c.d[:port]")
    read.add_argument("--device", type=int, required=True, metavar="N", help="the device instance (for messages)")
    read.add_argument("--object", required=True, metavar="TYPE,N", help="e.g. analog-input,1")
    read.add_argument("--property", default="present-value", metavar="P", help="default present-value")
    _local(read)
    read.set_defaults(handler=_read)

    plan = sub.add_parser("plan", help="print the ReadPropertyMultiple plan of every BACnet network of a site file")
    plan.add_argument("site", type=Path, help="site file (YAML)")
    plan.set_defaults(handler=_plan)


def _local(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        # all interfaces by default: the answers come back to whichever interface faces the BACnet network
        "--local",
        default="0.0.0.0",  # noqa: S104
        metavar="A[/P]",
        help="local address to bind (default 0.0.0.0)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=47809,
        help="local UDP port (default 47809, so a running gateway on 47808 is not disturbed; devices that answer "
        "Who-Is with a broadcast I-Am reach only 47808)",
    )
    parser.add_argument("--timeout", type=duration, default=3.0, help="answer timeout (default 3s)")


def _network(args: argparse.Namespace) -> BacnetNetworkConfig:
    return BacnetNetworkConfig.model_validate(
        {"id": "cli", "address": args.local, "port": args.port, "timeout": args.timeout, "retries": 0}
    )


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


# ---------------------------------------------------------------- read


def _read(args: argparse.Namespace) -> int:
    try:
        obj = parse_object_id(args.object)
        network = _network(args)
    except ValueError as exc:
        return _fail(str(exc), 1)
    try:
        value = asyncio.run(read_one(network, args.address, obj, args.property))
    except DeviceError as exc:
        return _fail(f"device {args.device}: {exc}", 3)
    print(f"device {args.device} {obj} {args.property} = {value!r}")
    return 0


async def read_one(network: BacnetNetworkConfig, address: str, obj: ObjectId, prop: str) -> Any:
    from drivers.bacnet.client import BacnetLink

    async with BacnetLink(network) as link:
        return await link.read_property(address, obj, prop)


# ---------------------------------------------------------------- discover


def _discover(args: argparse.Namespace) -> int:
    target: str | None = args.address
    if args.network:
        try:
            net = ipaddress.IPv4Network(args.network, strict=False)
        except ValueError as exc:
            return _fail(f"--network {args.network}: {exc}", 1)
        target = f"{net.broadcast_address}:47808"
    try:
        text = asyncio.run(discover(_network(args), target, args.seconds))
    except (ValueError, ConfigError) as exc:
        return _fail(str(exc), 1)
    except DeviceError as exc:
        return _fail(str(exc), 3)
    print(text)
    return 0


def _ident(text: str) -> str:
    name = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return name if name and name[0].isalpha() else f"p_{name}"


async def discover(network: BacnetNetworkConfig, target: str | None, seconds: float) -> str:
    """Who-Is, then for each device its object list, names and units; returns a ready site + profile snippet."""
    from drivers.bacnet.client import BacnetLink

    out: list[str] = []
    async with BacnetLink(network) as link:
        found = await link.who_is(None, None, target, seconds=seconds)
        if not found:
            where = target or "the local broadcast address"
            return f"# no I-Am to a Who-Is sent to {where} within {seconds:g}s"
        for i_am in sorted(found, key=lambda i: i.instance):
            out.append(
                f"# device {i_am.instance} at {i_am.address}: max-APDU {i_am.max_apdu}, "
                f"{i_am.segmentation}, vendor {i_am.vendor}"
            )
            device = ObjectId("device", i_am.instance)
            try:
                count = await link.read_property(i_am.address, device, "object-list", 0)
                objects: list[ObjectId] = []
                for index in range(1, int(count or 0) + 1):
                    raw = await link.read_property(i_am.address, device, "object-list", index)
                    try:
                        objects.append(parse_object_id(raw))
                    except ValueError:
                        continue  # an object type the driver does not read (schedule, calendar, program, ...)
            except BacnetRefused as exc:
                out.append(f"#   object-list unreadable ({exc})")
                continue
            out.append('driver: bacnet\nvendor: FIXME\nmodel: FIXME\ndoc: "bacnet discover output"\npoints:')
            names: set[str] = set()
            for obj in objects:
                if obj.type not in _POINT_TYPES:
                    continue
                try:
                    label = await link.read_property(i_am.address, obj, "object-name")
                except BacnetRefused:
                    label = str(obj)
                name = _ident(str(label))
                while name in names:
                    name += "_"
                names.add(name)
                unit = ""
                if obj.type.startswith(("analog", "large-analog", "integer", "accumulator")):
                    try:
                        raw_unit = await link.read_property(i_am.address, obj, "units")
                        unit_name = _unit_name(raw_unit)
                        if unit_name in ENGINEERING_UNITS:
                            unit = f", unit: {unit_name}"
                    except BacnetRefused:
                        pass
                out.append(f'  {name}: {{object: "{obj}"{unit}}}  # {label}')
            out.append(
                f"# site: - {{id: dev{i_am.instance}, driver: bacnet, profile: PROFILE, network: NET, "
                f'instance: {i_am.instance}, address: "{i_am.address}"}}'
            )
    return "\n".join(out)


def _unit_name(raw: Any) -> str:
    """The BACnet engineering-unit name of an enumeration value read as a number."""
    from bacpypes3.basetypes import EngineeringUnits

    try:
        return str(EngineeringUnits(int(raw)))
    except (ValueError, TypeError):
        return str(raw)


# ---------------------------------------------------------------- plan


def explain_network(network: BacnetNetworkConfig, devices: list[tuple[BacnetDeviceConfig, BacnetProfile]]) -> str:
    """The requests one full poll of each device takes, planned as the source would (before it learns more)."""
    lines = [f"bacnet[{network.id}] {network.bind}"]
    total = one_per_point = 0
    for device, profile in devices:
        planned = [
            PlannedPoint(f"{device.id}.{name}", spec.object, spec.property, spec.index, spec.kind)
            for name, spec in profile.points.items()
        ]
        if device.read_multiple is False:
            requests = len(planned)
            text = f"{requests} ReadProperty requests (read_multiple: false)"
        else:
            # until the device object is read the source assumes the configured or the smallest standard APDU
            max_apdu = device.max_apdu or 480
            plan = plan_reads(
                planned, budget=answer_budget(max_apdu, "no-segmentation"), max_properties=network.max_properties
            )
            requests = len(plan)
            text = describe_plan(plan, len(planned)) + f" (max-APDU {max_apdu}, no segmentation assumed)"
        total += requests
        one_per_point += len(planned)
        where = device.address or "found by Who-Is"
        lines.append(f"  {device.id} (device {device.instance}, {where}): {text}")
    lines.append(f"  per cycle: {total} requests ({one_per_point} with one ReadProperty per point)")
    return "\n".join(lines)


def _plan(args: argparse.Namespace) -> int:
    from drivers.bacnet.source import network_devices
    from gateway.config.site import load_site

    return print_site_plans(args.site, load_site, "bacnet_networks", network_devices, explain_network)
