"""Modbus driver benchmark: 50 devices x 100 points polled at 1 s from a real pymodbus TCP server.

Measures, for the gateway process only (the server runs in its own process so its CPU is not counted):
requests per cycle against the planner's theoretical minimum and against one request per point, CPU
microseconds per data point delivered, and RSS. The source publishes into a real ``Bus`` drained by one consumer,
as under the supervisor; the harness itself runs no timer (an earlier version polled a counter every 10 ms and
that cost as much CPU as the driver). Usage::

    .venv/bin/python bench/modbus.py [--quick] [--uvloop] [--devices 50] [--points 100] [--cycles 30]

The register map mixes f32, u32 (CDAB), i16 with scale and u16 points with a few small holes, like a meter map.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import subprocess
import sys
import time
from operator import itemgetter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig, ModbusProfile  # noqa: E402
from drivers.modbus.planner import minimum_requests, plan_device  # noqa: E402
from drivers.modbus.source import ModbusBusSource  # noqa: E402
from gateway.bus import Bus  # noqa: E402
from gateway.model import Quality  # noqa: E402

SERVER = ROOT / "tests" / "integration" / "modbus" / "modbus_server.py"


def make_profile(points: int) -> ModbusProfile:
    specs: dict[str, dict[str, object]] = {}
    address = 0
    kinds = [("f32", None, 2), ("u32", "CDAB", 2), ("i16", None, 1), ("u16", None, 1)]
    for index in range(points):
        type_name, order, width = kinds[index % 4]
        spec: dict[str, object] = {"table": "holding", "address": address, "type": type_name}
        if order:
            spec["order"] = order
        if type_name == "i16":
            spec["scale"] = 0.1
        specs[f"p{index:03d}"] = spec
        address += width + (1 if index % 10 == 9 else 0)  # a one-register hole every ten points
    return ModbusProfile.model_validate(
        {"driver": "modbus", "vendor": "Bench", "model": "Synthetic", "doc": "bench/modbus.py", "points": specs}
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(source: ModbusBusSource, cycles: int, devices: int) -> dict[str, float]:
    """Run the source into a real ``Bus`` (what the supervisor hands every source) with one blocking subscriber
    drained by a consumer, like the outbox's. The harness adds no timers of its own: the consumer counts with C
    builtins and wakes the main task through an event, so what is measured is the gateway's work."""
    bus = Bus()
    subscription = bus.subscribe("bench", maxsize=256)
    counts = {"samples": 0, "good": 0, "batches": 0}
    quality_of = itemgetter(3)
    target = devices  # warm-up: the first cycle connects and plans
    reached = asyncio.Event()

    async def consume() -> None:
        async for batch in subscription:
            counts["batches"] += 1
            counts["samples"] += len(batch)
            counts["good"] += list(map(quality_of, batch)).count(Quality.GOOD)
            if counts["batches"] == target:
                reached.set()

    stopping = asyncio.Event()
    consumer = asyncio.create_task(consume(), name="bench.consumer")
    task = asyncio.create_task(source.run(bus.publish, stopping), name="bench.modbus")
    await reached.wait()
    reached.clear()
    counts.update(samples=0, good=0, batches=0)
    target = devices * cycles
    cpu0, wall0 = cpu_seconds(), time.monotonic()
    await reached.wait()
    cpu, wall = cpu_seconds() - cpu0, time.monotonic() - wall0
    stopping.set()
    await task
    bus.close()
    await consumer
    return {"cpu_s": cpu, "wall_s": wall, **counts}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer cycles: finishes well within a minute")
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    cycles = 8 if args.quick else args.cycles

    profile = make_profile(args.points)
    port = free_port()
    units = list(range(1, args.devices + 1))
    server = subprocess.Popen(
        [sys.executable, str(SERVER), "--tcp", str(port), "--units", ",".join(map(str, units)), "--holding", "400"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("server did not start")
        bus = ModbusBusConfig.model_validate(
            {"id": "bench", "type": "tcp", "host": "127.0.0.1", "port": port, "timeout": "1s", "max_fill": 8}
        )
        devices = [
            (ModbusDeviceConfig(id=f"d{u:02d}", driver="modbus", profile="bench", bus="bench", unit=u), profile)
            for u in units
        ]
        plan_per_device = plan_device(bus, devices[0][0], profile)
        requests_per_cycle = len(plan_per_device) * len(devices)
        minimum = minimum_requests((d.unit, p.points.values()) for d, p in devices)
        if args.uvloop:
            import uvloop

            uvloop.install()
        source = ModbusBusSource(bus, devices)
        result = asyncio.run(measure(source, cycles, len(devices)))
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    points = result["samples"]
    figures = {
        "devices": args.devices,
        "points_per_device": args.points,
        "cycles": cycles,
        "requests_per_cycle": requests_per_cycle,
        "min_requests_per_cycle": minimum,
        "one_per_point_requests": args.devices * args.points,
        "samples": int(points),
        "good_ratio": round(result["good"] / points, 4) if points else 0.0,
        "wall_s": round(result["wall_s"], 2),
        "cpu_s": round(result["cpu_s"], 3),
        "cpu_us_per_point": round(result["cpu_s"] / points * 1e6, 2) if points else None,
        "cpu_share_of_core": round(result["cpu_s"] / result["wall_s"], 3),
        "rss_mib": round(rss_mib, 1),
        "loop": "uvloop" if args.uvloop else "asyncio",
    }
    print(
        f"plan per device: {len(plan_per_device)} requests; per cycle {requests_per_cycle} "
        f"(minimum {minimum}, one-per-point {args.devices * args.points})"
    )
    print(
        f"{points} points in {result['wall_s']:.1f}s, gateway CPU {result['cpu_s']:.2f}s "
        f"= {figures['cpu_us_per_point']} us/point, RSS {figures['rss_mib']} MiB"
    )
    print(json.dumps(figures))
    if figures["good_ratio"] != 1.0:
        # a failing link makes CPU per point meaningless (BAD samples cost nothing to decode): say so loudly
        raise SystemExit(f"not every sample was GOOD (good_ratio {figures['good_ratio']}): the figures are void")


if __name__ == "__main__":
    main()
