"""Memory per point of the gateway's per-point structures, built for real and fed through the real path in-process.

Builds a site of N points (N/5 simulated energy meters, 5 points each) with a rule file of windowed averages,
runs the real ``Gateway`` (supervisor, bus, live cache, outbox, rules, status server) with a source that publishes
K poll cycles of one batch per device, stamped with the real clock, then measures what each structure holds:

* ``deep`` bytes: every object reachable from the structure (sys.getsizeof, arrays with their buffers), counted
  once, in the order listed (what an earlier structure holds is not counted again by a later one);
* tracemalloc's traced memory for the whole run, by the source file that allocated it (top files);
* the process's RSS (includes SQLite's page cache and the interpreter, which tracemalloc does not see; tracemalloc's
  own bookkeeping inflates it several times, so take RSS from a ``--no-trace`` run).

    .venv/bin/python bench/memory.py                    # 5,000 points, 310 cycles (the live rings fill at 300)
    .venv/bin/python bench/memory.py --points 1000 --cycles 50 --no-http
    .venv/bin/python bench/memory.py --no-trace         # the process's RSS without tracemalloc's bookkeeping
    GATEWAY_SOURCE=/path/to/other/checkout .venv/bin/python bench/memory.py   # the same measurement of another tree

The status page counts as open (the live cache keeps the sparklines' history, the worst case); ``--unwatched``
leaves it unopened and ``--no-http`` runs without the status server (neither keeps any sparkline history). The last
line is one JSON object: ``bytes_per_point`` per structure and in total, ``traced_mib``, ``rss_mib``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import socket
import sys
import tempfile
import time
import tracemalloc
import types
from array import array
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("GATEWAY_SOURCE", str(REPO)))

from gateway.config.site import load_site  # noqa: E402 (after the path set-up, run as a script)
from gateway.driver_api import DeviceStatus  # noqa: E402
from gateway.model import Command, Quality, Sample  # noqa: E402
from gateway.supervisor import Gateway  # noqa: E402

POINTS_PER_DEVICE = 5  # sim-energy-meter
NAMES = ("power_kw", "energy_kwh", "voltage", "current", "pf")

SITE = """\
version: 1
gateway: {{id: mem_gw, site: mem_site, name: Memory benchmark}}
storage: {{durability: process, telemetry_budget: 256MiB}}
rules: [rules.yaml]
devices:
{devices}
"""


def write_site(directory: Path, devices: int, windows: int, window: str) -> Path:
    lines = [
        f"  - {{id: d{i:05d}, driver: simulator, profile: sim-energy-meter, seed: {i}, poll: 1s}}"
        for i in range(devices)
    ]
    path = directory / "site.yaml"
    path.write_text(SITE.format(devices="\n".join(lines)))  # the simulator profiles are bundled
    step = max(1, devices // max(windows, 1))
    derived = [
        f"  d{i:05d}.power_avg: {{avg: d{i:05d}.power_kw, window: {window}}}" for i in range(0, devices, step)[:windows]
    ]
    (directory / "rules.yaml").write_text(
        "version: 1\npoints:\n" + "\n".join(derived) + "\n" if derived else "version: 1\n"
    )
    return path


class CycleSource:
    """Publishes ``cycles`` poll cycles (one batch per device, as a polling driver does), then waits for the stop."""

    name = "bench"

    def __init__(self, devices: list[str], cycles: int, done: asyncio.Event) -> None:
        self._devices = devices
        self.cycles = cycles
        self.done = done
        self._statuses = [DeviceStatus(d, "simulator") for d in devices]

    @property
    def devices(self) -> frozenset[str]:
        return frozenset(self._devices)

    async def run(self, publish: Any, stopping: asyncio.Event) -> None:
        for cycle in range(self.cycles):
            for index, device in enumerate(self._devices):
                ts = time.time_ns()
                base = index + cycle * 0.001
                await publish(
                    [Sample(f"{device}.{name}", base + k * 0.25, ts, Quality.GOOD) for k, name in enumerate(NAMES)]
                )
            await asyncio.sleep(0)
        self.done.set()
        await stopping.wait()

    async def write(self, command: Command) -> None:
        raise NotImplementedError("the benchmark source takes no writes")

    def status(self) -> list[DeviceStatus]:
        return self._statuses


_SKIP = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.CodeType,
    types.FrameType,
    asyncio.AbstractEventLoop,
    logging.Logger,
)


def deep_size(root: object, seen: set[int], stop: Callable[[object], bool]) -> int:
    """Bytes of every object reachable from ``root`` not in ``seen`` (marked as it goes)."""
    total = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _SKIP) or stop(obj):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)  # an array's size includes its buffer
        if not isinstance(obj, (str, bytes, int, float, array)):
            stack.extend(gc.get_referents(obj))
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def measure(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    devices = args.points // POINTS_PER_DEVICE
    site = load_site(write_site(directory, devices, args.windows, args.window))
    done = asyncio.Event()
    source = CycleSource([f"d{i:05d}" for i in range(devices)], args.cycles, done)
    listen = "off" if args.no_http else f"127.0.0.1:{free_port()}"
    gateway = Gateway(site, data_dir=directory / "data", http_listen=listen, sources=[source])
    if not args.unwatched:
        gateway.live.watched()  # the status page is open: the sparklines' history is kept (the worst case)
    stop = asyncio.Event()
    runner = asyncio.create_task(gateway.run(stop))
    started = time.monotonic()
    await done.wait()
    # the outbox and the rules drain what the bus queued before anything is measured
    while any(sub.depth() for sub in gateway.bus.subscriptions()):
        await asyncio.sleep(0.05)
    fed_s = time.monotonic() - started
    gc.collect()
    traced, peak = tracemalloc.get_traced_memory()
    snapshot = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
    rss = rss_mib()  # before the walk below, whose set of visited objects would count in it

    seen: set[int] = {id(gateway), id(source)}
    # an object that belongs to the process rather than to one structure (the loop's machinery) stops the walk
    not_owned: Callable[[object], bool] = lambda obj: isinstance(obj, (asyncio.Task, asyncio.Future))  # noqa: E731
    structures: list[tuple[str, Iterable[object]]] = [
        ("registry", [gateway.registry]),
        ("live", [gateway.live]),
        ("bus", [gateway.bus]),
        ("rules", [gateway.rules]),
        ("aggregate", [gateway.aggregate]),
        ("outbox", [gateway.outbox]),
        ("uplinks", list(gateway.uplinks)),
    ]
    sizes = {name: sum(deep_size(o, seen, not_owned) for o in roots if o is not None) for name, roots in structures}
    by_file = snapshot.statistics("filename")[:8] if snapshot is not None else []
    stop.set()
    await runner
    points = devices * POINTS_PER_DEVICE
    return {
        "points": points,
        "cycles": args.cycles,
        "windows": args.windows,
        "http": not args.no_http,
        "fed_s": round(fed_s, 1),
        "sizes": sizes,
        "traced": traced,
        "peak": peak,
        "rss": rss,
        "by_file": [(str(s.traceback[0].filename), s.size) for s in by_file],
        "history_len": getattr(gateway.live, "history_len", None),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=5000)
    parser.add_argument("--cycles", type=int, default=310, help="poll cycles fed (the live rings hold 300)")
    parser.add_argument("--windows", type=int, default=100, help="rule points averaging a point over --window")
    parser.add_argument("--window", default="5min")
    parser.add_argument("--no-http", action="store_true", help="status server off (no sparkline history kept)")
    parser.add_argument(
        "--unwatched", action="store_true", help="status server on, nobody looking (no history until a reader comes)"
    )
    parser.add_argument(
        "--no-trace", action="store_true", help="without tracemalloc: an RSS not inflated by its bookkeeping"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if not args.no_trace:
        tracemalloc.start()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        result = asyncio.run(measure(args, Path(tmp)))
    points = result["points"]
    per_point = {name: round(size / points, 1) for name, size in result["sizes"].items()}
    total = round(sum(result["sizes"].values()) / points, 1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"source: {os.environ.get('GATEWAY_SOURCE', REPO)}")
    print(
        f"workload: {points} points, {result['cycles']} cycles fed in {result['fed_s']} s, "
        f"{result['windows']} rule windows of {args.window}, status server {'on' if result['http'] else 'off'} "
        f"(live history depth {result['history_len']})"
    )
    print("structure     bytes/point   MiB")
    for name, size in result["sizes"].items():
        print(f"  {name:<10} {size / points:>12,.1f} {size / 2**20:>6.1f}")
    print(f"  {'total':<10} {total:>12,.1f} {sum(result['sizes'].values()) / 2**20:>6.1f}")
    if not args.no_trace:
        print(
            f"tracemalloc: {result['traced'] / 2**20:.1f} MiB traced now, "
            f"{result['peak'] / 2**20:.1f} MiB peak; by file:"
        )
        for filename, size in result["by_file"]:
            print(f"  {size / 2**20:7.1f} MiB  {filename}")
    overhead = "" if args.no_trace else " (with tracemalloc's own bookkeeping: use --no-trace for the real figure)"
    print(f"RSS{overhead}: {result['rss']:.1f} MiB")
    print(
        json.dumps(
            {
                "bench": "memory",
                "points": points,
                "cycles": result["cycles"],
                "http": result["http"],
                "bytes_per_point": per_point,
                "total_bytes_per_point": total,
                "traced_mib": None if args.no_trace else round(result["traced"] / 2**20, 1),
                "rss_mib": round(result["rss"], 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
