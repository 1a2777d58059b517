"""Process against process: ThingsBoard IoT Gateway and edge-gateway on the same simulator, broker and checks.

Installs ThingsBoard IoT Gateway (PyPI ``thingsboard-gateway``, 3.8.5, the version measured in FIELD-NOTES.md)
into its own venv under a cache dir outside the repository (``~/.cache/edge-gateway-bench/tb-venv``; created once,
reused while it holds that version), starts one pymodbus simulator and one Mosquitto (bench/_whole_harness.py),
then runs ThingsBoard, then edge-gateway, one after the other, each for the same time, each measured the same way
(whole-process CPU of all threads and RSS at 1 Hz after a warm-up, every delivered value checked by one
subscriber), and prints both rows and the ratios. The last line is one JSON object.

ThingsBoard is given its best "wide" configuration: per device one address range per register table
(``"address": "0-99"``, keys ``h_${address}``), read in chunks of up to 124 registers (``maxRegistersPerRequest``;
its default is 16), so it makes as few requests as edge-gateway's planner (2 per device per poll). It talks to the
local Mosquitto as it would to a ThingsBoard server (gateway API, ``v1/gateway/telemetry``, QoS 1, memory
storage); the server's session-limits RPC goes unanswered, after which it uses its defaults (no rate limits on a
non-cloud host). Its package defaults are kept otherwise, except: remote configuration, remote shell and its
statistics messages off (they need a real server, and sending fewer messages only helps it), and its once-an-hour
update check stubbed out (this machine reaches no update service).

    .venv/bin/python bench/peer_tb.py --quick        # about 2 minutes each, plus the install on the first run
    .venv/bin/python bench/peer_tb.py --minutes 7    # the issue's 420 s steady-state run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _whole_harness as harness

TB_VERSION = "3.8.5"
# the version its Modbus connector demands at import; anything else and it pip-installs this one while starting
TB_PYMODBUS = "3.9.2"
TB_PACKAGES = [f"thingsboard-gateway=={TB_VERSION}", f"pymodbus=={TB_PYMODBUS}", "pyserial", "pyserial-asyncio"]
MAX_REGISTERS = 124  # its best: an even number (floats never split across chunks) within Modbus's 125

# Runs inside ThingsBoard's venv. Its updater posts to the vendor's update service once an hour from a thread; no
# network here, and that is no work a site would measure: stubbed. Everything else is its own service as shipped.
LAUNCHER = """\
import sys
from thingsboard_gateway.tb_utility import tb_updater
tb_updater.TBUpdater.check_for_new_version = lambda self: None
from thingsboard_gateway.gateway.tb_gateway_service import TBGatewayService
TBGatewayService(sys.argv[1])
"""


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-gateway-bench"


def installed_versions(python: Path) -> tuple[str, str] | None:
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m; print(m.version('thingsboard-gateway'), m.version('pymodbus'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return None
    tb, pymodbus = probe.stdout.split()
    return tb, pymodbus


def ensure_tb(cache: Path) -> Path:
    """ThingsBoard's venv, made with the same interpreter as edge-gateway's (Debian's python3 where it exists)."""
    venv = cache / "tb-venv"
    python = venv / "bin" / "python"
    if python.exists() and installed_versions(python) == (TB_VERSION, TB_PYMODBUS):
        return python
    print(f"installing ThingsBoard IoT Gateway {TB_VERSION} into {venv} (pip, once)", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    base = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    log = cache / "tb-install.log"
    with log.open("w") as out:
        for step in (
            [base, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "--progress-bar", "off", *TB_PACKAGES],
        ):
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, check=False).returncode != 0:
                raise SystemExit(
                    f"installing ThingsBoard failed: {' '.join(step)}\n" + log.read_text(errors="replace")[-3000:]
                )
    if installed_versions(python) != (TB_VERSION, TB_PYMODBUS):
        raise SystemExit(f"ThingsBoard's venv does not hold {TB_PACKAGES[:2]} after installing; see {log}")
    return python


def tb_config(
    python: Path,
    directory: Path,
    *,
    modbus_port: int,
    broker_port: int,
    devices: int,
    points: int,
    max_registers: int = MAX_REGISTERS,
) -> Path:
    """A config dir made from the package's own defaults (logs.json and the rest), pointed at the local broker."""
    located = subprocess.run(
        [str(python), "-c", "import thingsboard_gateway, os; print(os.path.dirname(thingsboard_gateway.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    )
    config = directory / "config"
    # its logs.json writes to ./logs, which its own entry point creates before loading it (without the folder the
    # whole logging config fails and it falls back to printing everything, pymodbus's warnings included)
    (directory / "logs").mkdir()
    shutil.copytree(Path(located.stdout.strip()) / "config", config)
    main: dict[str, Any] = json.loads((config / "tb_gateway.json").read_text())
    tb = main["thingsboard"]
    tb.update(host="127.0.0.1", port=broker_port, qos=1, remoteConfiguration=False, remoteShell=False)
    tb["statistics"]["enable"] = False
    tb["security"] = {"type": "accessToken", "accessToken": "bench-peer"}
    main["storage"] = {"type": "memory", "read_records_count": 100, "max_records_count": 100000}
    main["grpc"]["enabled"] = False
    main["connectors"] = [{"type": "modbus", "name": "Modbus", "configuration": "bench_modbus.json"}]
    (config / "tb_gateway.json").write_text(json.dumps(main, indent=2))

    counts = [sum(1 for t, _ in harness.layout(points) if t == table) for table in (0, 1)]
    slaves = []
    for unit in range(1, devices + 1):
        timeseries = [
            {
                "tag": f"{harness.TABLES[table]}_${{address}}",
                "type": "32float",
                "functionCode": (3, 4)[table],
                "objectsCount": 2,
                "address": f"0-{2 * counts[table] - 1}",
                "maxRegistersPerRequest": max_registers,
            }
            for table in (0, 1)
            if counts[table]
        ]
        slaves.append(
            {
                "host": "127.0.0.1",
                "port": modbus_port,
                "type": "tcp",
                "method": "socket",
                "unitId": unit,
                "deviceName": harness.device_name(unit),
                "deviceType": "default",
                "timeout": 1,
                "byteOrder": "BIG",
                "wordOrder": "BIG",
                "retries": 3,
                "retryOnEmpty": True,
                "retryOnInvalid": True,
                "pollPeriod": 1000,
                "connectAttemptTimeMs": 5000,
                "connectAttemptCount": 5,
                "waitAfterFailedAttemptsMs": 300000,
                "attributes": [],
                "timeseries": timeseries,
                "attributeUpdates": [],
                "rpc": [],
            }
        )
    (config / "bench_modbus.json").write_text(json.dumps({"master": {"slaves": slaves}}, indent=2))
    return config / "tb_gateway.json"


def wait_delivering(proc: subprocess.Popen[Any], tally: harness.Tally, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"ThingsBoard exited before delivering (code {proc.returncode}):\n"
                + log.read_text(errors="replace")[-4000:]
            )
        if tally.delivered or tally.bad:
            return
        time.sleep(0.5)
    raise SystemExit(
        f"ThingsBoard delivered nothing in {timeout} s; last lines of its output:\n"
        + log.read_text(errors="replace")[-4000:]
    )


def run_tb(
    python: Path,
    *,
    modbus_port: int,
    broker_port: int,
    subscriber: harness.Subscriber,
    devices: int,
    points: int,
    warmup: float,
    seconds: float,
    max_registers: int = MAX_REGISTERS,
) -> harness.Measurement:
    with tempfile.TemporaryDirectory(prefix="bench-tb-") as tmp:
        work = Path(tmp)
        main = tb_config(
            python,
            work,
            modbus_port=modbus_port,
            broker_port=broker_port,
            devices=devices,
            points=points,
            max_registers=max_registers,
        )
        tally = harness.Tally()
        subscriber.tally = tally
        log_path = work / "tb-output.log"
        env = {**os.environ, "TB_GW_CONFIG_DIR": str(main.parent)}
        env.pop("PYTHONPATH", None)
        with log_path.open("wb") as log_file:
            # cwd: it writes ./logs and ./data relative to where it runs
            proc = subprocess.Popen(
                [str(python), "-c", LAUNCHER, str(main)],
                cwd=work,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_delivering(proc, tally, log_path)
            result = harness.measure(
                proc,
                tally,
                harness.LineCounter(log_path),
                warmup=warmup,
                seconds=seconds,
                expected_per_s=devices * points,
                label="ThingsBoard",
            )
        finally:
            # SIGINT is what its service loop handles as a stop; killed if it does not stop in 30 s
            harness.stop_process(proc, sig=2)
        return result


def row(m: harness.Measurement) -> dict[str, float | int | None]:
    return {
        "cpu_us_per_point": m.cpu_us_per_point,
        "rss_mib": m.rss_mib,
        "delivered_per_s": m.delivered_per_s,
        "bad_values": m.bad_values,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.common_arguments(parser)
    parser.add_argument("--cache-dir", type=Path, default=default_cache(), help="where ThingsBoard's venv lives")
    parser.add_argument(
        "--tb-max-registers",
        type=int,
        default=MAX_REGISTERS,
        help="ThingsBoard's maxRegistersPerRequest for the ranges (even, 2..124; its own default is 16)",
    )
    args = parser.parse_args()
    if not (2 <= args.tb_max_registers <= MAX_REGISTERS and args.tb_max_registers % 2 == 0):
        raise SystemExit("--tb-max-registers must be even and 2..124 (a float must not straddle two reads)")
    warmup, seconds = harness.window(args)
    harness.check_limits(args.devices, args.points)
    python = ensure_tb(args.cache_dir)

    print(harness.machine_line())
    print(
        f"workload: {args.devices} devices x {args.points} f32 points polled every 1 s "
        f"({args.devices * args.points} values/s), both to Mosquitto at QoS 1, one gateway at a time; "
        f"warm-up {warmup:.0f} s, measured {seconds:.0f} s each",
        flush=True,
    )
    with harness.interrupts_as_exit(), ExitStack() as stack:
        modbus_port = stack.enter_context(harness.simulator(args.devices, args.points))
        broker_port = stack.enter_context(harness.broker())
        subscriber = harness.Subscriber(broker_port)
        stack.callback(subscriber.close)
        common = {
            "modbus_port": modbus_port,
            "broker_port": broker_port,
            "subscriber": subscriber,
            "devices": args.devices,
            "points": args.points,
            "warmup": warmup,
            "seconds": seconds,
        }
        print(
            f"ThingsBoard IoT Gateway {TB_VERSION} (pymodbus {TB_PYMODBUS}, {python.parent.parent}), ranges read "
            f"{args.tb_max_registers} registers at a time",
            flush=True,
        )
        tb = run_tb(python, **common, max_registers=args.tb_max_registers)
        print(harness.machine_line(), flush=True)
        print("edge-gateway (this tree)", flush=True)
        edge = harness.run_edge(**common, telemetry_version=args.telemetry_version)

    print(harness.machine_line())
    for label, m in (("ThingsBoard", tb), ("edge-gateway", edge)):
        for line in harness.describe(label, m):
            print(line)
    # a window of W seconds holds W or W - 1 whole polls depending on where it starts, so "all of it" means at least
    # (W - 1.5) seconds' worth: a gateway that falls behind (a growing backlog) or drops values is under that
    equal = all(m.delivered >= m.expected_per_s * (m.window_s - 1.5) and m.bad_values == 0 for m in (tb, edge))
    if not equal:
        print(
            "NOT equal delivery (one side delivered less than was served, short of one poll's rounding, or a bad "
            "value): the CPU ratio compares unequal work"
        )
    print(f"{'figure':24} {'ThingsBoard':>12} {'edge-gateway':>13} {'TB / edge':>10}")
    for key, unit in (("cpu_us_per_point", "us"), ("rss_mib", "MiB"), ("delivered_per_s", "/s")):
        a, b = getattr(tb, key), getattr(edge, key)
        print(f"{key + ' (' + unit + ')':24} {a!s:>12} {b!s:>13} {ratio(a, b)!s:>10}")
    print(f"{'bad_values':24} {tb.bad_values!s:>12} {edge.bad_values!s:>13}")
    print(
        json.dumps(
            {
                "thingsboard": row(tb),
                "edge_gateway": row(edge),
                "ratio_tb_over_edge": {
                    key: ratio(getattr(tb, key), getattr(edge, key))
                    for key in ("cpu_us_per_point", "rss_mib", "delivered_per_s")
                },
                "equal_delivery": equal,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
