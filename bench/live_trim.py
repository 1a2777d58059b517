"""What dropping the live cache's history gives back to the OS, with and without glibc's ``malloc_trim``.

Fills the real ``LiveCache`` the way the bus does (one batch per device per poll cycle, the latest samples replaced
as the rings grow) until every ring is full, drops the rings (``stop_history``, as an unwatched page does after
10 minutes) with the release turned off, then calls ``release_freed_heap`` (what the cache does on each drop) and
prints the process's RSS at each step. The array buffers of the rings come from the C heap, which glibc keeps
mapped after they are freed: without the trim the RSS stays at the high-water mark.

    .venv/bin/python bench/live_trim.py                        # 5,000 points (50 devices x 100), depth 300
    .venv/bin/python bench/live_trim.py --points 20000 --depth 300

The last line is one JSON object: ``rss_mib`` at each step (before, full, dropped, trimmed), ``trim_ms``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("GATEWAY_SOURCE", str(REPO)))

from gateway.live import LiveCache, release_freed_heap  # noqa: E402 (after the path set-up, run as a script)
from gateway.model import Quality, Sample  # noqa: E402

POINTS_PER_DEVICE = 100  # as bench/whole.py polls them


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def fill(cache: LiveCache, points: int, cycles: int) -> None:
    devices = max(1, points // POINTS_PER_DEVICE)
    names = [[f"d{d:05d}.p{p:03d}" for p in range(POINTS_PER_DEVICE)] for d in range(devices)]
    ts = time.time_ns()
    for cycle in range(cycles):
        ts += 1_000_000_000
        for device, ids in enumerate(names):
            cache.update([Sample(point, device + k + cycle * 0.001, ts, Quality.GOOD) for k, point in enumerate(ids)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=5000)
    parser.add_argument("--depth", type=int, default=300, help="values per ring (the status page shows 300)")
    args = parser.parse_args()

    cache = LiveCache(history=args.depth, release=lambda: None)  # the release is timed on its own below
    fill(cache, args.points, 1)  # unwatched: the latest values only
    gc.collect()
    steps = {"before": rss_mib()}
    cache.watched()
    fill(cache, args.points, args.depth)
    gc.collect()
    rings = len(cache.history)
    full = sum(len(ring) for ring in cache.history.values())
    steps["full"] = rss_mib()
    cache.stop_history()
    gc.collect()
    steps["dropped"] = rss_mib()
    started = time.perf_counter()
    release_freed_heap()
    trim_ms = (time.perf_counter() - started) * 1000
    steps["trimmed"] = rss_mib()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"workload: {rings} rings filled to {full // max(rings, 1)} values ({args.depth} deep), then dropped")
    print("step                          RSS MiB")
    labels = {
        "before": "unwatched (latest values)",
        "full": "rings full",
        "dropped": "dropped, no trim",
        "trimmed": "dropped, then malloc_trim",
    }
    for step, label in labels.items():
        print(f"  {label:<28}{steps[step]:7.1f}")
    print(f"malloc_trim took {trim_ms:.1f} ms")
    print(
        json.dumps(
            {
                "bench": "live_trim",
                "points": rings,
                "depth": args.depth,
                "rss_mib": {k: round(v, 1) for k, v in steps.items()},
                "trim_ms": round(trim_ms, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
