"""Outbox and uplink benchmark: append rate, replay rate of a backlog to a real VictoriaMetrics while live data keeps
flowing, and the live data's latency during that replay.

    .venv/bin/python bench/outbox.py            # 1,000,000-point backlog
    .venv/bin/python bench/outbox.py --quick    # 200,000 points, under a minute

Append: one producer awaiting each committed batch of 100 samples (as the supervisor's store loop does), and
4 producers at once (as several drivers do). Replay: the backlog is stored with creation times an hour old, so the
runner treats all of it as backfill; a producer appends a live batch of 100 samples every 20 ms meanwhile, and a
watcher records when the live cursor passes each live batch (latency = acked - committed). Pressure: a 44 KiB
telemetry budget (``--pressure-budget``), an uplink that never acks and batches of 100 samples appended one after
another: the append rate while every append drops, and the peak of the files' sizes (db + wal + shm, read after each
append) against the budget plus the outbox's documented margin. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.config.site import load_site  # noqa: E402
from gateway.model import Quality, Sample  # noqa: E402
from gateway.outbox import Outbox  # noqa: E402
from gateway.uplinks.runner import build_uplinks  # noqa: E402
from tests.services import VictoriaMetrics  # noqa: E402

DEVICES = 20
POINTS = ("power_kw", "energy_kwh", "voltage", "current", "pf")
BATCH = DEVICES * len(POINTS)  # 100 samples: one poll of 20 meters
#: a live poll of 100 samples every 20 ms: 5,000 samples/s of live data during the replay
LIVE_EVERY = 0.02


def poll(ts_ns: int, k: int) -> list[Sample]:
    return [
        Sample(f"b{d}.{p}", 100.0 + d + i * 0.5 + k * 0.001, ts_ns, Quality.GOOD)
        for d in range(DEVICES)
        for i, p in enumerate(POINTS)
    ]


async def bench_append(tmp: Path, total: int, durability: str) -> dict[str, float]:
    outbox = Outbox(tmp / "append.db", telemetry_budget=2 * 1024**3, durability=durability)  # type: ignore[arg-type]
    batches = [poll(1_700_000_000_000_000_000 + k * 1_000_000, k) for k in range(total // BATCH)]
    started = time.perf_counter()
    for batch in batches:
        await outbox.append(batch)
    sequential = total / (time.perf_counter() - started)

    async def producer(part: list[list[Sample]]) -> None:
        for batch in part:
            await outbox.append(batch)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for n in range(4):
            tg.create_task(producer(batches[n::4]))
    concurrent = total / (time.perf_counter() - started)
    await outbox.close()
    return {"append_samples_per_s": sequential, "append_4_producers_samples_per_s": concurrent}


async def bench_pressure(tmp: Path, budget: int, appends: int) -> dict[str, float]:
    outbox = Outbox(tmp / "pressure.db", telemetry_budget=budget, event_budget=4 * 1024)  # no events here
    await outbox.register_cursor("stalled", "telemetry")
    batches = [poll(1_700_000_000_000_000_000 + k * 1_000_000, k) for k in range(appends)]
    peak = {"db": 0, "wal": 0, "shm": 0, "total": 0}
    elapsed = 0.0
    for batch in batches:
        started = time.perf_counter()
        await outbox.append(batch)
        elapsed += time.perf_counter() - started  # the footprint reads below are not the append's cost
        usage = outbox.disk_usage()
        for name, size in usage.items():
            peak[name] = max(peak[name], size)
        peak["total"] = max(peak["total"], sum(usage.values()))
    result = {
        "pressure_budget_bytes": budget,
        "pressure_append_samples_per_s": appends * BATCH / elapsed,
        "pressure_dropped_samples": outbox.stats.dropped_samples,
        "pressure_peak_disk_bytes": peak["total"],
        "pressure_peak_db_bytes": peak["db"],
        "pressure_peak_wal_bytes": peak["wal"],
        "pressure_peak_shm_bytes": peak["shm"],
        "pressure_disk_limit_bytes": budget + outbox.event_budget + outbox.disk_margin,
    }
    await outbox.close()
    return result


def write_site(tmp: Path, url: str, *, gzip: bool) -> Path:
    devices = "".join(
        f"  - {{id: b{d}, driver: simulator, profile: sim-energy-meter, seed: {d}}}\n" for d in range(DEVICES)
    )
    site = tmp / "site.yaml"
    site.write_text(
        "version: 1\ngateway: {id: bench, site: lab}\n"
        f"devices:\n{devices}"
        f"uplinks:\n  influx: {{url: '{url}', org: lab, bucket: bench, gzip: {str(gzip).lower()},"
        " delivery: {batch_size: 5000, max_inflight: 4, replay_share: 0.5, live_window: 10s}}\n"
    )
    return site


async def bench_replay(tmp: Path, backlog: int, tsdb: VictoriaMetrics, *, gzip: bool) -> dict[str, float]:
    hour_ago = time.time_ns() - 3600 * 10**9
    stamp = {"now": hour_ago}
    outbox = Outbox(tmp / "replay.db", telemetry_budget=4 * 1024**3, time_ns=lambda: stamp["now"] or time.time_ns())
    base_ts = (time.time_ns() // 10**6 - 3_600_000) * 10**6
    # Build the backlog concurrently (4 producers), so the writer groups commits as it would under load.
    batches = [poll(base_ts + k * 1_000_000, k) for k in range(backlog // BATCH)]

    async def producer(part: list[list[Sample]]) -> None:
        for batch in part:
            await outbox.append(batch)

    async with asyncio.TaskGroup() as tg:
        for n in range(4):
            tg.create_task(producer(batches[n::4]))
    stamp["now"] = 0  # from here on records are stamped with the real clock: live

    site = load_site(write_site(tmp, tsdb.url, gzip=gzip))
    (runner,) = build_uplinks(site, outbox, commands=lambda c: asyncio.sleep(0))
    committed: dict[int, float] = {}
    acked: dict[int, float] = {}
    stopping = asyncio.Event()
    live_done = asyncio.Event()

    async def live_producer() -> None:
        k = 0
        while not live_done.is_set():
            await outbox.append(poll(time.time_ns() // 10**6 * 10**6, 10**6 + k))
            committed[outbox.last_seq("telemetry")] = time.perf_counter()
            k += 1
            await asyncio.sleep(LIVE_EVERY)

    async def watcher() -> None:
        while not stopping.is_set():
            cursor = outbox.uplink_cursor("influx")
            now = time.perf_counter()
            for seq in [s for s in committed if s not in acked and cursor.delivered(s)]:
                acked[seq] = now
            await asyncio.sleep(0.002)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(runner.run(stopping))
        while not runner.status()["replaying"]:  # live data starts once the backlog is known as such
            await asyncio.sleep(0.001)
        tg.create_task(live_producer())
        tg.create_task(watcher())
        while runner.status()["replaying"]:
            await asyncio.sleep(0.02)
        replay_seconds = time.perf_counter() - started
        live_done.set()
        await asyncio.sleep(0.5)
        stopping.set()
    latencies = sorted((acked[s] - committed[s]) * 1000 for s in committed if s in acked)
    status = runner.status()
    await outbox.close()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else float("nan")
    return {
        "replay_points_per_s": status["replayed_samples"] / replay_seconds,
        "replay_seconds": replay_seconds,
        "replayed_samples": status["replayed_samples"],
        "live_batches": len(latencies),
        "live_latency_p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "live_latency_p99_ms": p99,
        "live_latency_max_ms": latencies[-1] if latencies else float("nan"),
        "quarantined": status["quarantined"],
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200k-point backlog: under a minute")
    parser.add_argument("--gzip", action="store_true", help="gzip the writes (off by default: loopback)")
    parser.add_argument(
        "--durability", choices=["process", "power"], default="process", help="outbox durability for the append test"
    )
    parser.add_argument("--append-only", action="store_true", help="skip the replay (no VictoriaMetrics needed)")
    parser.add_argument(
        "--pressure-budget", type=int, default=44 * 1024, help="telemetry budget in bytes of the pressure run"
    )
    args = parser.parse_args()
    append_total = 200_000 if args.quick else 1_000_000
    backlog = 200_000 if args.quick else 1_000_000
    result: dict[str, object] = {
        "quick": args.quick,
        "gzip": args.gzip,
        "durability": args.durability,
        "backlog_points": backlog,
    }
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as name:
        tmp = Path(name)
        appended = await bench_append(tmp, append_total, args.durability)
        print(
            f"append: {appended['append_samples_per_s']:,.0f} samples/s (1 producer, batches of {BATCH}); "
            f"{appended['append_4_producers_samples_per_s']:,.0f} samples/s (4 producers)"
        )
        result.update(appended)
        pressure = await bench_pressure(tmp, args.pressure_budget, 2_000 if args.quick else 10_000)
        print(
            f"pressure: {pressure['pressure_append_samples_per_s']:,.0f} samples/s appended over a "
            f"{args.pressure_budget:,}-byte budget with a stalled uplink; files on disk peaked at "
            f"{pressure['pressure_peak_disk_bytes']:,} bytes (db {pressure['pressure_peak_db_bytes']:,}, "
            f"wal {pressure['pressure_peak_wal_bytes']:,}, shm {pressure['pressure_peak_shm_bytes']:,}); "
            f"limit {pressure['pressure_disk_limit_bytes']:,}"
        )
        result.update(pressure)
        if args.append_only:
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}))
            return
        tsdb = VictoriaMetrics()
        tsdb.start()
        try:
            replay = await bench_replay(tmp, backlog, tsdb, gzip=args.gzip)
        finally:
            tsdb.close()
        print(
            f"replay: {replay['replayed_samples']:,} points in {replay['replay_seconds']:.1f}s = "
            f"{replay['replay_points_per_s']:,.0f} points/s to VictoriaMetrics while live data flowed"
        )
        print(
            f"live latency during replay: p50 {replay['live_latency_p50_ms']:.1f} ms, "
            f"p99 {replay['live_latency_p99_ms']:.1f} ms, max {replay['live_latency_max_ms']:.1f} ms "
            f"({replay['live_batches']} live batches)"
        )
        result.update(replay)
    result["machine"] = f"{platform.machine()} {platform.python_version()}"
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    asyncio.run(main())
