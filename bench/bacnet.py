"""BACnet/IP polling cost: ReadPropertyMultiple against one ReadProperty per point, on real bacpypes3 devices.

    .venv/bin/python bench/bacnet.py --quick        # 20 devices x 50 points, 5 cycles each way

The devices run in a child process (``--serve``: bacpypes3 applications on loopback UDP ports, the same helper the
tests use), so the gateway's CPU and RSS are measured alone. The gateway side is the driver's own source
(``BacnetNetworkSource.poll_device``), all devices polled concurrently per cycle, as ``run`` does. The last line is
one JSON object: requests_per_cycle (RPM), one_per_point_requests, cpu_us_per_point (RPM) and, for the comparison,
rp_cpu_us_per_point, plus rss_mib (peak RSS of the gateway process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def serve(devices: int, points: int) -> None:
    from tests.integration.bacnet.devices import start_device

    started = []
    for n in range(devices):
        objects = {f"analog-input,{i}": float(i) for i in range(1, points + 1)}
        started.append(await start_device(10_000 + n, objects))
    print(json.dumps([d.address for d in started]), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    for device in started:
        device.close()


async def measure(addresses: list[str], points: int, cycles: int, rpm: bool) -> dict[str, float]:
    from drivers.bacnet.client import BacnetLink
    from drivers.bacnet.config import BacnetDeviceConfig, BacnetNetworkConfig, BacnetProfile
    from drivers.bacnet.source import BacnetNetworkSource
    from tests.integration.bacnet.devices import free_udp_port

    net = BacnetNetworkConfig.model_validate(
        {"id": "bench", "address": "127.0.0.1", "port": free_udp_port(), "timeout": "3s", "retries": 1}
    )
    profile = BacnetProfile.model_validate(
        {
            "driver": "bacnet",
            "vendor": "bench",
            "model": "b",
            "doc": "bench",
            "points": {
                f"t{i}": {"object": f"analog-input,{i}", "unit": "degrees-celsius"} for i in range(1, points + 1)
            },
        }
    )
    devices = [
        (
            BacnetDeviceConfig.model_validate(
                {
                    "id": f"d{n}",
                    "driver": "bacnet",
                    "profile": "b",
                    "network": "bench",
                    "instance": 10_000 + n,
                    "address": address,
                    "read_multiple": rpm,
                }
            ),
            profile,
        )
        for n, address in enumerate(addresses)
    ]
    source = BacnetNetworkSource(net, devices)
    async with BacnetLink(net) as link:
        polled = source._devices
        # the first poll reads each device object (max-APDU, segmentation): not part of the steady state
        await asyncio.gather(*(source.poll_device(link, d, tuple(d.groups)) for d in polled))
        samples = 0
        bad = 0
        cpu = time.process_time()
        wall = time.perf_counter()
        requests = 0
        for _ in range(cycles):
            batches = await asyncio.gather(*(source.poll_device(link, d, tuple(d.groups)) for d in polled))
            samples += sum(len(b) for b in batches)
            bad += sum(1 for b in batches for s in b if s.value is None)
            requests += sum(int(d.status.info["requests_last_poll"] or 0) for d in polled)
        cpu = time.process_time() - cpu
        wall = time.perf_counter() - wall
    return {
        "requests_per_cycle": requests / cycles,
        "cpu_us_per_point": cpu / samples * 1e6,
        "points_per_s": samples / wall,
        "bad": bad,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="20 devices x 50 points, 5 cycles")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.devices, args.points, args.cycles = 20, 50, 5
    if args.serve:
        asyncio.run(serve(args.devices, args.points))
        return
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--devices", str(args.devices), "--points", str(args.points)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        addresses = json.loads(child.stdout.readline())
        rpm = asyncio.run(measure(addresses, args.points, args.cycles, rpm=True))
        one = asyncio.run(measure(addresses, args.points, args.cycles, rpm=False))
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    print(
        f"RPM:         {rpm['requests_per_cycle']:.0f} requests/cycle, {rpm['cpu_us_per_point']:.1f} us CPU/point, "
        f"{rpm['points_per_s']:.0f} points/s, {rpm['bad']} bad"
    )
    print(
        f"ReadProperty: {one['requests_per_cycle']:.0f} requests/cycle, {one['cpu_us_per_point']:.1f} us CPU/point, "
        f"{one['points_per_s']:.0f} points/s, {one['bad']} bad"
    )
    print(
        json.dumps(
            {
                "devices": args.devices,
                "points_per_device": args.points,
                "cycles": args.cycles,
                "requests_per_cycle": rpm["requests_per_cycle"],
                "one_per_point_requests": one["requests_per_cycle"],
                "cpu_us_per_point": round(rpm["cpu_us_per_point"], 1),
                "rp_cpu_us_per_point": round(one["cpu_us_per_point"], 1),
                "points_per_s": round(rpm["points_per_s"]),
                "rp_points_per_s": round(one["points_per_s"]),
                "bad_samples": rpm["bad"] + one["bad"],
                "rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
