"""Modbus recovery benchmark: how long after a device comes back do its readings come back (issue 15, item 2).

A real pymodbus TCP server (``tests/integration/modbus/modbus_server.py``, its own process) is polled by one
``ModbusBusSource`` with the bus defaults (reconnect 0.25 s doubling to 2 s, +/-20 % jitter; gateway/reconnect.py).
Each round: wait for GOOD samples, kill the server (power loss), keep it down ``--down`` seconds, start it again,
and measure the gap from the moment the server accepts connections again to the first GOOD sample published. It
also counts the BAD samples each point got during the outage against the poll cycles the outage spanned, to show
the outage is explicit interval by interval. Usage::

    .venv/bin/python bench/modbus_recovery.py [--rounds 3] [--down 20] [--poll 1]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig, ModbusProfile  # noqa: E402
from drivers.modbus.source import ModbusBusSource  # noqa: E402
from gateway.model import Quality, Sample  # noqa: E402

SERVER = ROOT / "tests" / "integration" / "modbus" / "modbus_server.py"
PROFILE = ModbusProfile.model_validate(
    {
        "driver": "modbus",
        "vendor": "Bench",
        "model": "Recovery",
        "doc": "bench/modbus_recovery.py",
        "points": {f"p{i}": {"table": "holding", "address": 2 * i, "type": "f32"} for i in range(10)},
    }
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> float:
        """Start the server; return the monotonic time it first accepted a connection."""
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--tcp", str(self.port), "--units", "1"], stdout=subprocess.PIPE, text=True
        )
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.05):
                    return time.monotonic()
            except OSError:
                time.sleep(0.002)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--down", type=float, default=20.0, help="seconds the device stays off each round")
    parser.add_argument("--poll", type=float, default=1.0, help="poll interval in seconds")
    args = parser.parse_args()

    server = Server(free_port())
    server.start()
    bus = ModbusBusConfig.model_validate(
        {"id": "bench", "type": "tcp", "host": "127.0.0.1", "port": server.port, "timeout": "1s"}
    )
    device = ModbusDeviceConfig(id="meter", driver="modbus", profile="bench", bus="bench", unit=1, poll=args.poll)
    source = ModbusBusSource(bus, [(device, PROFILE)])
    batches: list[tuple[float, list[Sample]]] = []
    good = asyncio.Event()

    async def publish(batch: list[Sample]) -> None:
        batches.append((time.monotonic(), batch))
        if batch and all(s.quality is Quality.GOOD for s in batch):
            good.set()

    stopping = asyncio.Event()
    task = asyncio.create_task(source.run(publish, stopping))
    gaps: list[float] = []
    explicit: list[float] = []
    try:
        await asyncio.wait_for(good.wait(), timeout=10)
        for round_no in range(1, args.rounds + 1):
            server.kill()
            killed = time.monotonic()
            await asyncio.sleep(args.down)
            good.clear()
            mark = len(batches)
            up = await asyncio.to_thread(server.start)
            await asyncio.wait_for(good.wait(), timeout=30)
            first_good = next(t for t, b in batches[mark:] if b and all(s.quality is Quality.GOOD for s in b))
            gap = first_good - up
            bad = [b for t, b in batches if killed <= t < first_good and b and all(s.quality is Quality.BAD for s in b)]
            cycles = (first_good - killed) / args.poll
            per_point = len(bad)  # each BAD batch carries every point of the device once
            gaps.append(gap)
            explicit.append(per_point / cycles)
            print(
                f"round {round_no}: down {args.down:g}s; first GOOD sample {gap:.3f}s after the server was up; "
                f"{per_point} BAD samples per point over {cycles:.1f} poll cycles"
            )
            await asyncio.sleep(2 * args.poll)
    finally:
        stopping.set()
        await task
        server.kill()
    result = {
        "bench": "modbus_recovery",
        "rounds": args.rounds,
        "down_s": args.down,
        "poll_s": args.poll,
        "reconnect_min_s": bus.reconnect_min,
        "reconnect_max_s": bus.reconnect_max,
        "gap_s": [round(g, 3) for g in gaps],
        "gap_median_s": round(statistics.median(gaps), 3),
        "gap_max_s": round(max(gaps), 3),
        "bad_samples_per_cycle": [round(e, 2) for e in explicit],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
