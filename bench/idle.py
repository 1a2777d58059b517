"""Idle cost of a running gateway: 10 simulated devices polled every second, status server on, nobody watching.

Runs the real command (``python -m gateway run SITE --http 127.0.0.1:PORT``) in its own process, waits until
``/readyz`` says ready, lets it settle, then measures its CPU (user + system, all threads, from /proc) over the
measurement window and its resident memory at the end. ``--watch`` adds one open status page: a client that polls
``/api/points`` every second, as the page's JavaScript does. ``--http off`` runs it without the status server (no
aiohttp, no prometheus-client): readiness then comes from the gateway's systemd ``READY=1`` on a ``NOTIFY_SOCKET``
the bench listens on, and the samples stored are not reported (there is no API to ask).

    .venv/bin/python bench/idle.py                # 60 s measured after 5 s warm-up
    .venv/bin/python bench/idle.py --seconds 20 --watch
    .venv/bin/python bench/idle.py --seconds 20 --http off
    .venv/bin/python bench/idle.py --imports      # where the RSS goes: the import steps of a running gateway

``--imports`` runs no gateway: it imports what ``run`` imports, step by step, each cumulative step in a fresh
interpreter (median of 3), and prints its peak RSS (``VmHWM``, what ``ru_maxrss`` reports for a process started
from a small one) after each step and the step's delta.

Figures go to stdout; the last line is one JSON object with ``cpu_percent`` (of one core) and ``rss_mib``.
ThingsBoard IoT Gateway idles at about 7% of a core on this machine (FIELD-NOTES.md); the target here is < 1%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.config.types import parse_duration  # noqa: E402 (after the path set-up, run as a script)

TICKS = os.sysconf("SC_CLK_TCK")

SITE = """\
version: 1
gateway: {{id: bench_gw, site: bench_site, name: Idle benchmark}}
storage: {{durability: process}}
devices:
{devices}
"""
PROFILES = ("sim-energy-meter", "sim-zone", "sim-ahu")


def write_site(directory: Path, devices: int, poll: str) -> Path:
    lines = [
        f"  - {{id: dev{i:02d}, driver: simulator, profile: {PROFILES[i % 3]}, seed: {i}, poll: {poll}}}"
        for i in range(devices)
    ]
    path = directory / "site.yaml"
    path.write_text(SITE.format(devices="\n".join(lines)))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
        return body


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the gateway exited before it was ready")
        try:
            get(url + "/readyz")
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("the gateway never became ready")


def wait_notify_ready(sock: socket.socket, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Wait for ``READY=1`` on the bench's NOTIFY_SOCKET (the sd_notify protocol, gateway/systemd.py)."""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the gateway exited before it was ready")
        try:
            message = sock.recv(4096)
        except TimeoutError:
            continue
        if b"READY=1" in message.split(b"\n"):
            return
    raise TimeoutError("the gateway never sent READY=1")


#: (label, statement): cumulative, in the order ``edge-gateway run`` imports them; the last two are what a running
#: gateway imports only when asked (the first /metrics scrape) or no longer at all (the incentive key tools)
IMPORT_STEPS = (
    ("bare interpreter", "pass"),
    ("import pydantic", "import pydantic"),
    ("asyncio, uvloop", "import asyncio, uvloop"),
    ("yaml, sqlite3", "import yaml, sqlite3"),
    ("gateway.cli, gateway.commands (config layer, site loader)", "import gateway.cli, gateway.commands"),
    ("every plugin loaded (entry points)", "from gateway.plugins import plugins; plugins()"),
    ("gateway.supervisor", "import gateway.supervisor"),
    ("aiohttp", "import aiohttp"),
    ("aiohttp.web", "import aiohttp.web"),
    ("gateway.http.server", "import gateway.http.server"),
    ("gateway.metrics + prometheus-client (at the first /metrics scrape)", "import gateway.metrics"),
    ("gateway.incentives.cli (cryptography; not imported by run)", "import gateway.incentives.cli"),
)


def import_steps() -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at this (larger) process's peak, kept across fork and exec
    report = "\nfor line in open('/proc/self/status'):\n    if line.startswith('VmHWM:'): print(line.split()[1])"
    steps: list[dict[str, object]] = []
    previous: float | None = None
    for n, (label, _statement) in enumerate(IMPORT_STEPS):
        code = "\n".join(statement for _, statement in IMPORT_STEPS[: n + 1]) + report
        runs = sorted(
            int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout) / 1024
            for _ in range(3)
        )
        mib = runs[1]
        delta = "" if previous is None else f"{mib - previous:+.1f}"
        print(f"{label:70s} {mib:6.1f} MiB {delta}")
        steps.append({"step": label, "rss_mib": round(mib, 1)})
        previous = mib
    print(json.dumps({"bench": "idle-imports", "python": platform.python_version(), "steps": steps}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--poll", default="1s")
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--watch", action="store_true", help="poll /api/points every second (one open page)")
    parser.add_argument("--http", choices=("on", "off"), default="on", help="run the status server (default on)")
    parser.add_argument("--imports", action="store_true", help="measure the import steps only (no gateway runs)")
    args = parser.parse_args()
    if args.imports:
        return import_steps()
    if args.watch and args.http == "off":
        parser.error("--watch needs the status server (--http on)")
    http = args.http == "on"

    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        site = write_site(Path(tmp), args.devices, args.poll)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if not http:
            notify.bind(str(Path(tmp) / "notify"))
            env["NOTIFY_SOCKET"] = str(Path(tmp) / "notify")
        command = [sys.executable, "-m", "gateway", "run", str(site), "--http", f"127.0.0.1:{port}" if http else "off"]
        command += ["--data-dir", str(Path(tmp) / "data")]
        log_path = Path(tmp) / "gateway.log"
        log = log_path.open("wb")
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        stored: int | None = None
        try:
            if http:
                wait_ready(url, proc)
                points = len(json.loads(get(url + "/api/points")))
            else:
                wait_notify_ready(notify, proc)
                up = re.search(rb" (\d+) points", log_path.read_bytes())
                points = int(up.group(1)) if up else 0
            time.sleep(args.warmup)
            cpu_start, wall_start = cpu_seconds(proc.pid), time.monotonic()
            next_poll = wall_start
            while (now := time.monotonic()) < wall_start + args.seconds:
                if args.watch and now >= next_poll:
                    get(url + "/api/points")
                    next_poll += 1.0
                time.sleep(min(0.2, max(0.0, wall_start + args.seconds - now)))
            cpu_used, wall = cpu_seconds(proc.pid) - cpu_start, time.monotonic() - wall_start
            rss = rss_mib(proc.pid)
            if http:
                stored = json.loads(get(url + "/api/queues"))["outbox"]["appended_samples"]
        finally:
            notify.close()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()

    cpu_percent = 100 * cpu_used / wall
    samples_per_s = points / parse_duration(args.poll)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(
        f"workload: {args.devices} simulated devices, {points} points, poll {args.poll} ({samples_per_s:.0f} samples/s)"
    )
    print(f"status server: {args.http}; status page polled every second: {'yes' if args.watch else 'no'}")
    print(
        f"measured {wall:.1f} s after {args.warmup:.0f} s warm-up: CPU {cpu_used:.2f} s = {cpu_percent:.2f}% of a core"
    )
    print(f"RSS at the end: {rss:.1f} MiB; samples stored since start: {stored}")
    print(
        json.dumps(
            {
                "bench": "idle",
                "devices": args.devices,
                "points": points,
                "poll": args.poll,
                "http": http,
                "watch": args.watch,
                "seconds": round(wall, 1),
                "cpu_percent": round(cpu_percent, 3),
                "rss_mib": round(rss, 1),
                "samples_stored": stored,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
