"""What ``bench/whole.py`` and ``bench/peer_tb.py`` share: the Modbus simulator, the broker, the checking subscriber,
the process sampler and the run of the real ``edge-gateway run`` process.

Whole-process figures, one gateway at a time: the gateway under test is its own process; the simulator (a pymodbus
server), Mosquitto and the subscriber run in other processes or in this one, so none of their CPU is counted.

**Values are exact.** Every device (Modbus unit U) serves f32 points in two tables (holding, then input registers,
ABCD order, contiguous). Point j of table T of unit U has the identity ``ident = (U * 2 + T) * 512 + j`` and, during
the Unix second s, the value ``(ident * 64 + s % 64) / 4``: an f32 holds it exactly (below 2**24 / 4), so a
subscriber can tell from the value alone which point it is (a wrong register, unit or word order shows) and which
second it was read in (a stale or repeated value shows), compared with the message's own timestamp. Every delivered
value is checked; ``bad_values`` counts the ones that fail and every message that cannot be read at all.

Run as a script, this module is the simulator: ``python bench/_whole_harness.py simulate --port P --devices D
--points N`` prints ``ready`` once listening (pymodbus is imported only there, so the harness itself runs under any
Python with paho-mqtt).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
TABLES = ("h", "i")  # holding registers (function code 3), input registers (function code 4)
FLOATS_PER_TABLE_MAX = 512
MAX_LAG_S = 30  # a value read more than this before its message's timestamp is stale: counted bad


# --- the value every point serves -------------------------------------------------------------------------------


def point_ident(unit: int, table: int, index: int) -> int:
    return (unit * 2 + table) * FLOATS_PER_TABLE_MAX + index


def served_value(ident: int, second: int) -> float:
    return (ident * 64 + second % 64) / 4


def layout(points: int) -> list[tuple[int, int]]:
    """(table, index) of each of a device's ``points``: the first half in holding registers, the rest in input."""
    holding = points // 2
    return [(0, j) for j in range(holding)] + [(1, j) for j in range(points - holding)]


def device_name(unit: int) -> str:
    return f"d{unit:03d}"


def edge_point_name(table: int, index: int) -> str:
    return f"{TABLES[table]}{index:03d}"


def check_limits(devices: int, points: int) -> None:
    if not 1 <= devices <= 247:
        raise SystemExit("--devices must be 1..247 (Modbus unit ids)")
    if not 1 <= points <= 2 * FLOATS_PER_TABLE_MAX:
        raise SystemExit(f"--points must be 1..{2 * FLOATS_PER_TABLE_MAX}")


# --- the simulator (its own process) ----------------------------------------------------------------------------


def _simulate(port: int, devices: int, points: int) -> None:
    import asyncio
    import logging
    import struct
    import warnings
    from functools import partial

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    counts = [sum(1 for t, _ in layout(points) if t == table) for table in (0, 1)]
    pack = struct.Struct(">2H").unpack

    def words(unit: int, table: int, second: int) -> list[int]:
        out: list[int] = []
        for j in range(counts[table]):
            out.extend(pack(struct.pack(">f", served_value(point_ident(unit, table, j), second))))
        return out

    # function code -> table; each block is rewritten on its first read in a new second, so every response holds
    # the values of one second, and the server does no work for a second nobody reads
    fc_table = {3: 0, 4: 1}
    current: dict[tuple[int, int], int] = {}

    async def refresh(
        unit: int, fc: int, _start: int, _address: int, _count: int, registers: list[int], values: object
    ) -> None:
        table = fc_table.get(fc)
        if table is None or values:
            return
        second = int(time.time())
        if current.get((unit, table)) != second:
            current[unit, table] = second
            fresh = words(unit, table, second)
            registers[: len(fresh)] = fresh

    def block(table: int, unit: int) -> list[SimData]:
        size = max(2, 2 * counts[table])
        return [
            SimData(0, values=words(unit, table, int(time.time()))[:size] or [0] * size, datatype=DataType.REGISTERS)
        ]

    sims = [
        SimDevice(
            id=unit,
            simdata=(
                [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                block(0, unit),
                block(1, unit),
            ),
            action=partial(refresh, unit),
        )
        for unit in range(1, devices + 1)
    ]

    async def serve() -> None:
        server = ModbusTcpServer(sims, address=("127.0.0.1", port))
        task = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0.3)
        print("ready", flush=True)
        await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


# --- processes --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], *, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int:
    """Ask once (SIGTERM: the gateway drains forward), then kill; always reaped."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def simulator(devices: int, points: int) -> Iterator[int]:
    """A pymodbus TCP server in its own process (its CPU is not the gateway's); yields its port."""
    check_limits(devices, points)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "simulate", "--port", str(port), "--devices", str(devices), "--points", str(points)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # Ctrl-C reaches only this script, which stops everything in order
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("the Modbus simulator did not start")
        yield port
    finally:
        stop_process(proc, timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def broker() -> Iterator[int]:
    """Mosquitto on a free loopback port, as the integration tests start it (tests/services.py); yields the port."""
    sys.path.insert(0, str(REPO))
    from tests.services import Mosquitto

    service = Mosquitto()
    service.start()
    assert service.proc is not None
    try:
        yield service.port
    finally:
        service.close()


# --- checking what arrives --------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one gateway delivered; updated from the subscriber's thread, read from the main thread."""

    delivered: int = 0
    bad: int = 0
    max_lag_s: int = 0
    messages: int = 0
    examples: list[str] = field(default_factory=list)

    def note_bad(self, what: str, count: int = 1) -> None:
        self.bad += count
        if len(self.examples) < 5:
            self.examples.append(what)

    def check(self, unit: int, table: int, index: int, value: object, ts_ms: int) -> None:
        """One delivered value against what the simulator served for that point near ``ts_ms``."""
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.note_bad(f"{device_name(unit)} {TABLES[table]}{index}: not a number: {value!r}")
            return
        quarter = value * 4
        if quarter != int(quarter):
            self.note_bad(f"{device_name(unit)} {TABLES[table]}{index}: {value!r} is no served value")
            return
        raw = int(quarter)
        if raw >> 6 != point_ident(unit, table, index):
            self.note_bad(f"{device_name(unit)} {TABLES[table]}{index}: {value!r} belongs to another point")
            return
        lag = (ts_ms // 1000 - (raw & 63)) % 64
        if lag >= 60:  # served up to 4 s "after" its timestamp: clock granularity, not staleness
            lag = 0
        elif lag > MAX_LAG_S:
            self.note_bad(f"{device_name(unit)} {TABLES[table]}{index}: {value!r} read {lag} s before its ts")
            return
        self.max_lag_s = max(self.max_lag_s, lag)
        self.delivered += 1


def parse_edge_telemetry(topic: str, payload: bytes, tally: Tally) -> None:
    """Platform telemetry v1 (``telemetry/{device}``: ``{"ts", "values": {point: value}}``) and v2 (``{"reads":
    [{"ts", "values"}, ...]}``, one message per device and poll); also a list of v1 documents and point keys given
    as ``device.point``, so another batched form is still counted and checked."""
    try:
        doc = json.loads(payload)
        docs = doc if isinstance(doc, list) else doc.get("reads", [doc])
        topic_device = topic.rsplit("/", 1)[-1]
        for item in docs:
            ts_ms = int(item["ts"])
            for key, value in item["values"].items():
                device, _, name = key.rpartition(".")
                unit = int((device or topic_device)[1:])
                tally.check(unit, TABLES.index(name[0]), int(name[1:]), value, ts_ms)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        tally.note_bad(f"unreadable message on {topic}: {exc!r}: {payload[:120]!r}")


def parse_tb_telemetry(payload: bytes, tally: Tally) -> None:
    """ThingsBoard gateway API (``v1/gateway/telemetry``): ``{device: [{"ts", "values": {key: value}}]}``; keys
    are the wide-range tags ``h_${address}`` / ``i_${address}`` (two registers per float)."""
    try:
        doc = json.loads(payload)
        now_ms = int(time.time() * 1000)
        for device, entries in doc.items():
            unit = int(device[1:])
            for entry in entries:
                values = entry.get("values", entry)
                ts_ms = int(entry.get("ts", now_ms))
                for key, value in values.items():
                    if key == "ts":
                        continue
                    table, _, address = key.partition("_")
                    tally.check(unit, TABLES.index(table), int(address) // 2, value, ts_ms)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        tally.note_bad(f"unreadable ThingsBoard message: {exc!r}: {payload[:120]!r}")


EDGE_TOPIC = "city/bench_site/bench_gw/#"
TB_TELEMETRY = "v1/gateway/telemetry"
TB_RPC_REQUEST = "v1/devices/me/rpc/request/"
#: what a ThingsBoard CE server answers a gateway's ``getSessionLimits`` RPC with its default tenant profile (MQTT
#: transport payload limit 64 KiB, 100 messages in flight, no rate limits). ThingsBoard's gateway sends nothing
#: until it has this answer (tb-mqtt-client 1.13.13 waits for it without a timeout), so the subscriber plays the
#: server's part here; ThingsBoard then uses 80 % of each figure, as against a real server.
TB_SESSION_LIMITS = {"maxPayloadSize": 65536, "maxInflightMessages": 100, "rateLimits": {}, "gatewayRateLimits": {}}


class Subscriber:
    """A plain paho client on its own thread: counts and checks every telemetry value of the gateway whose tally
    is current (``tally`` is swapped between gateways). QoS 1 subscriptions, as the platform would subscribe."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.tally = Tally()
        self.ignored = 0
        self.tb_session_answers = 0
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-subscriber")
        self._client.on_message = self._on_message
        self._subscribed = threading.Event()
        self._client.on_subscribe = lambda *_args: self._subscribed.set()
        self._client.connect("127.0.0.1", port, keepalive=60)
        self._client.loop_start()
        self._client.subscribe([(EDGE_TOPIC, 1), (TB_TELEMETRY, 1), (TB_RPC_REQUEST + "+", 1)])
        if not self._subscribed.wait(10):
            raise SystemExit("the subscriber could not subscribe to the broker")

    def _on_message(self, _client: object, _userdata: object, message: Any) -> None:
        tally = self.tally
        topic: str = message.topic
        if topic == TB_TELEMETRY:
            tally.messages += 1
            parse_tb_telemetry(message.payload, tally)
        elif "/telemetry" in topic and topic.startswith("city/"):
            tally.messages += 1
            parse_edge_telemetry(topic, message.payload, tally)
        elif topic.startswith(TB_RPC_REQUEST):
            self._answer_tb_rpc(topic[len(TB_RPC_REQUEST) :], message.payload)
        else:
            self.ignored += 1  # status, meta, ThingsBoard's connect and attribute messages

    def _answer_tb_rpc(self, request_id: str, payload: bytes) -> None:
        try:
            method = json.loads(payload).get("method")
        except (ValueError, AttributeError):
            return
        if method == "getSessionLimits":
            self.tb_session_answers += 1
            self._client.publish(f"v1/devices/me/rpc/response/{request_id}", json.dumps(TB_SESSION_LIMITS), qos=1)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class OutboxTail:
    """Without an uplink the outbox is the delivery: a reader on its own thread follows the gateway's
    ``outbox.db`` (SQLite WAL allows a second reader) and checks every stored value, as the subscriber would."""

    def __init__(self, path: Path, tally: Tally) -> None:
        sys.path.insert(0, str(REPO))
        from gateway.outbox import decode_samples  # the stored format is the gateway's own

        self._decode = decode_samples
        self._path = path
        self.tally = tally
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-tail", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._path.exists() and not self._stop.wait(0.2):
            pass
        db = sqlite3.connect(self._path, timeout=5)
        last = 0
        try:
            while not self._stop.wait(0.5):
                with contextlib.suppress(sqlite3.OperationalError):  # the gateway may not have made its table yet
                    rows = db.execute("SELECT seq, payload FROM telemetry WHERE seq > ? ORDER BY seq", (last,))
                    for seq, payload in rows.fetchall():
                        last = seq
                        self.tally.messages += 1
                        for point, value, ts, _quality, _reason in self._decode(payload):
                            device, _, name = point.partition(".")
                            self.tally.check(
                                int(device[1:]), TABLES.index(name[0]), int(name[1:]), value, ts // 1_000_000
                            )
        finally:
            db.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


# --- measuring a process ----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class LineCounter:
    """Lines the gateway printed (its stdout and stderr go to one file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.lines = 0

    def count(self) -> int:
        with self.path.open("rb") as log:
            log.seek(self._offset)
            chunk = log.read()
        self._offset += len(chunk)
        self.lines += chunk.count(b"\n")
        return self.lines


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB), in MiB per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return 60 * sum((t - mean_t) * (y - mean_y) for t, y in points) / var


@dataclass
class Measurement:
    cpu_us_per_point: float | None
    rss_mib: float
    rss_growth_mib_per_min: float
    log_lines_per_min: float
    delivered_per_s: float
    bad_values: int
    # context, printed but not in the last line
    expected_per_s: float
    window_s: float
    delivered: int
    cpu_share_of_core: float
    rss_start_mib: float
    max_lag_s: int
    messages: int
    examples: list[str]

    def figures(self) -> dict[str, float | int | None]:
        """The last line's object: exactly these keys."""
        keys = (
            "cpu_us_per_point",
            "rss_mib",
            "rss_growth_mib_per_min",
            "log_lines_per_min",
            "delivered_per_s",
            "bad_values",
        )
        return {key: asdict(self)[key] for key in keys}


def measure(
    proc: subprocess.Popen[Any],
    tally: Tally,
    log: LineCounter,
    *,
    warmup: float,
    seconds: float,
    expected_per_s: float,
    label: str,
) -> Measurement:
    """Warm up, then sample the process's CPU and RSS, the delivered count and the log at 1 Hz for ``seconds``."""
    deadline = time.monotonic() + warmup
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{label} exited during warm-up (code {proc.returncode}); see its log: {log.path}")
        time.sleep(0.25)
    bad_before = tally.bad
    samples: list[tuple[float, float, float, int, int]] = []
    start = time.monotonic()
    tick = start
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{label} exited while measured (code {proc.returncode}); see its log: {log.path}")
        now = time.monotonic()
        samples.append((now - start, cpu_seconds(proc.pid), rss_mib(proc.pid), tally.delivered, log.count()))
        if now - start >= seconds:
            break
        tick += 1.0
        time.sleep(max(0.0, tick - time.monotonic()))
        if len(samples) % 15 == 0:
            t, cpu, rss, delivered, _ = samples[-1]
            rate = (delivered - samples[0][3]) / t if t else 0.0
            print(
                f"  {label}: {t:5.0f} s  {rate:7.0f} points/s delivered  CPU {cpu - samples[0][1]:6.2f} s  "
                f"RSS {rss:6.1f} MiB  bad {tally.bad - bad_before}",
                flush=True,
            )
    t0, cpu0, rss0, delivered0, lines0 = samples[0]
    t1, cpu1, rss1, delivered1, lines1 = samples[-1]
    wall = t1 - t0
    delivered = delivered1 - delivered0
    cpu = cpu1 - cpu0
    return Measurement(
        cpu_us_per_point=round(cpu / delivered * 1e6, 2) if delivered else None,
        rss_mib=round(rss1, 1),
        rss_growth_mib_per_min=round(slope_per_min([(s[0], s[2]) for s in samples]), 2),
        log_lines_per_min=round((lines1 - lines0) / wall * 60, 1),
        delivered_per_s=round(delivered / wall, 1),
        bad_values=tally.bad,  # the whole run's, warm-up included: a wrong value is wrong whenever it came
        expected_per_s=expected_per_s,
        window_s=round(wall, 1),
        delivered=delivered,
        cpu_share_of_core=round(cpu / wall, 3),
        rss_start_mib=round(rss0, 1),
        max_lag_s=tally.max_lag_s,
        messages=tally.messages,
        examples=list(tally.examples),
    )


def describe(label: str, m: Measurement) -> list[str]:
    share = m.delivered_per_s / m.expected_per_s if m.expected_per_s else 0.0
    lines = [
        f"{label}: delivered {m.delivered} values in {m.window_s} s = {m.delivered_per_s}/s "
        f"({share:.1%} of the {m.expected_per_s:.0f}/s served), bad values {m.bad_values}, "
        f"oldest value {m.max_lag_s} s before its timestamp",
        f"{label}: CPU {m.cpu_share_of_core:.1%} of a core = {m.cpu_us_per_point} us per delivered point; "
        f"RSS {m.rss_start_mib} -> {m.rss_mib} MiB ({m.rss_growth_mib_per_min:+} MiB/min); "
        f"{m.log_lines_per_min} log lines/min",
    ]
    lines += [f"{label}: bad: {example}" for example in m.examples]
    return lines


def machine_line() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; load average {load}; "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
    )


# --- edge-gateway -----------------------------------------------------------------------------------------------


def write_edge_site(
    directory: Path, *, modbus_port: int, broker_port: int | None, devices: int, points: int, telemetry_version: int = 1
) -> Path:
    """A site file as an operator would write one: a profile of ``points`` f32 points, one TCP bus (the
    simulator), ``devices`` devices polled every second, and the platform uplink at QoS 1 unless ``broker_port``
    is None (then the outbox is the only consumer). ``telemetry_version`` 2 is written only when asked for (a
    gateway without that setting refuses the key)."""
    profiles = directory / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    lines = [
        "driver: modbus",
        "vendor: Bench",
        "model: Floats",
        'doc: "bench/_whole_harness.py: f32 points, holding then input registers"',
        "order: ABCD",
        "points:",
    ]
    table_names = ("holding", "input")
    for table, index in layout(points):
        lines.append(
            f"  {edge_point_name(table, index)}: {{table: {table_names[table]}, address: {2 * index}, type: f32}}"
        )
    (profiles / "bench-floats.yaml").write_text("\n".join(lines) + "\n")
    site = [
        "version: 1",
        "gateway: {id: bench_gw, site: bench_site, name: Whole-process benchmark}",
        "storage: {durability: process}",
        "profile_dirs: [profiles]",
        "modbus_buses:",
        f"  - {{id: sim, type: tcp, host: 127.0.0.1, port: {modbus_port}, timeout: 1s}}",
        "devices:",
    ]
    site += [
        f"  - {{id: {device_name(u)}, driver: modbus, profile: bench-floats, bus: sim, unit: {u}, poll: 1s}}"
        for u in range(1, devices + 1)
    ]
    if broker_port is not None:
        version = f", telemetry_version: {telemetry_version}" if telemetry_version != 1 else ""
        site += ["uplinks:", f"  platform: {{host: 127.0.0.1, port: {broker_port}, qos: 1{version}}}"]
    path = directory / "site.yaml"
    path.write_text("\n".join(site) + "\n")
    return path


def edge_command() -> list[str]:
    """The installed console script beside this Python (the .venv's), else ``python -m gateway``."""
    script = Path(sys.executable).parent / "edge-gateway"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway"]


def wait_ready(url: str, proc: subprocess.Popen[Any], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"edge-gateway exited before it was ready (code {proc.returncode}):\n"
                + log.read_text(errors="replace")[-3000:]
            )
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"edge-gateway not ready after {timeout} s; log: {log}")


def run_edge(
    *,
    modbus_port: int,
    broker_port: int | None,
    subscriber: Subscriber | None,
    devices: int,
    points: int,
    warmup: float,
    seconds: float,
    keep: Path | None = None,
    telemetry_version: int = 1,
) -> Measurement:
    """Check the generated site with ``edge-gateway check``, run ``edge-gateway run`` on it (data dir in a temp
    dir), measure, and stop it with SIGTERM. With ``broker_port`` None the outbox is followed instead."""
    with tempfile.TemporaryDirectory(prefix="bench-whole-") as tmp:
        work = Path(tmp)
        site = write_edge_site(
            work,
            modbus_port=modbus_port,
            broker_port=broker_port,
            devices=devices,
            points=points,
            telemetry_version=telemetry_version,
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("NOTIFY_SOCKET", None)  # not under systemd here
        data_dir = work / "data"
        http = f"127.0.0.1:{free_port()}"
        check = subprocess.run(
            [*edge_command(), "check", str(site), "--data-dir", str(data_dir), "--http", http],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            raise SystemExit(f"edge-gateway check refused the generated site:\n{check.stdout}{check.stderr}")
        tally = Tally()
        log_path = work / "gateway.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [*edge_command(), "run", str(site), "--data-dir", str(data_dir), "--http", http],
                env=env,
                cwd=REPO,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        tail: OutboxTail | None = None
        try:
            wait_ready(f"http://{http}", proc, log_path)
            if subscriber is not None:
                subscriber.tally = tally
            else:
                tail = OutboxTail(data_dir / "outbox.db", tally)
            result = measure(
                proc,
                tally,
                LineCounter(log_path),
                warmup=warmup,
                seconds=seconds,
                expected_per_s=devices * points,
                label="edge-gateway",
            )
        finally:
            code = stop_process(proc)
            if tail is not None:
                tail.close()
            if keep is not None:
                keep.write_bytes(log_path.read_bytes())
        if code != 0:
            print(
                f"edge-gateway exited with code {code} on SIGTERM; last lines:\n"
                + "\n".join(log_path.read_text(errors="replace").splitlines()[-10:])
            )
        return result


@contextlib.contextmanager
def interrupts_as_exit() -> Iterator[None]:
    """SIGTERM (and Ctrl-C) unwind through every ``finally``, so every process this bench started is stopped."""

    def on_term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    # a shell starting this in the background sets SIGINT to ignored, and Python keeps that: take it back
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted: every process this bench started was stopped", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="about 2 minutes per gateway, warm-up included")
    parser.add_argument("--minutes", type=float, default=2.0, help="per gateway, warm-up included (a soak: 60)")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before measuring")
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--points", type=int, default=100, help="f32 points per device")
    parser.add_argument(
        "--telemetry-version",
        type=int,
        choices=(1, 2),
        default=1,
        help="edge-gateway's platform payload (2: one message per device and poll, where the gateway has it)",
    )


def window(args: argparse.Namespace) -> tuple[float, float]:
    """(warm-up, measured seconds) from the arguments."""
    total = 120.0 if args.quick else args.minutes * 60
    warmup = min(args.warmup, total / 2)
    return warmup, total - warmup


def main() -> None:
    parser = argparse.ArgumentParser(description="the Modbus simulator of the whole-process benchmarks")
    parser.add_argument("mode", choices=["simulate"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--points", type=int, required=True)
    args = parser.parse_args()
    _simulate(args.port, args.devices, args.points)


if __name__ == "__main__":
    main()
