"""Rule latency benchmark: a sensor message in -> the rule's actions out, through the whole gateway process.

A probe sensor publishes ``{"trigger": 1, "seq": N}`` (QoS 1) to Mosquitto; the gateway (``python -m gateway run``,
its own process, default delivery settings) decodes it, the rule ``probe.trigger > 0.5`` fires and

* writes ``seq`` to a holding register of a real pymodbus server (running in this process: the write's arrival
  is stamped in the server's request handler), and
* publishes ``{"seq": N}`` (through the outbox and the platform uplink, as every rule publish travels) to a
  subscriber in this process.

Each probe's two latencies are measured from just before the probe's publish to the write's arrival at the Modbus
server and to the publish's arrival at the subscriber (``time.monotonic_ns``, one clock: every stamp is taken in
this process). Then ``trigger: 0`` clears the rule before the next probe. Meanwhile ``mosquitto_pub -l`` sends a
background load of sensor messages (default 1,000 msg/s, 4 values each) to the same gateway.

    .venv/bin/python bench/latency.py --quick        # 40 probes, < 1 minute
    .venv/bin/python bench/latency.py                # 200 probes at 1k msg/s background load

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import logging  # noqa: E402
import warnings  # noqa: E402

import orjson  # noqa: E402
import paho.mqtt.client as paho  # noqa: E402
from mqtt_ingest import start_publisher  # noqa: E402  (the paced C publisher of the ingest benchmark)
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from pymodbus.server import ModbusTcpServer  # noqa: E402
from pymodbus.simulator import DataType, SimData, SimDevice  # noqa: E402

from tests.services import Mosquitto, free_port  # noqa: E402

warnings.simplefilter("ignore")  # pymodbus's experimental-simulator notice
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

PROFILE = """driver: modbus
vendor: Bench
model: Actuator
measurement: bench
doc: one writable holding register, written by the latency rule
points:
  setpoint: {table: holding, address: 0, type: u16, writable: true, min: 0, max: 65535}
"""
RULES = """version: 1
allow:
  modbus:
    - {point: actuator.setpoint, min: 0, max: 65535}
rules:
  - id: probe-fires
    when: probe.trigger > 0.5
    then:
      - write: {point: actuator.setpoint, value: "=probe.seq"}
      - publish: {topic: probe/fired, payload: {seq: "=probe.seq"}}
"""
SITE = """version: 1
gateway: {{id: gwlat, site: bench}}
http: {{enabled: false}}
profile_dirs: ["."]
modbus_buses:
  - {{id: plant, type: tcp, host: 127.0.0.1, port: {modbus_port}, timeout: 0.5s}}
mqtt_sources:
  - id: building
    host: 127.0.0.1
    port: {broker_port}
    subscriptions:
      - {{id: probe, topic: "probe/+", qos: 1, decoder: {{type: json}}}}
      - {{id: load, topic: "bench/+/state", decoder: {{type: json}}}}
devices:
  - {{id: actuator, driver: modbus, profile: bench-actuator, bus: plant, unit: 1, poll: 1s}}
  - id: probe
    driver: mqtt
    source: building
    topic_name: p1
    subscription: probe
    points: {{trigger: {{}}, seq: {{}}}}
  - id: sensor1
    driver: mqtt
    source: building
    subscription: load
    points: {{temperature: {{}}, humidity: {{}}, co2: {{kind: int}}, pressure: {{}}}}
rules: [rules.yaml]
uplinks:
  platform: {{host: 127.0.0.1, port: {broker_port}, prefix: lat}}
"""


class Arrivals:
    """seq -> monotonic ns of its arrival, filled from the Modbus server's handler and the subscriber's thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.times: dict[int, int] = {}
        self.changed = threading.Condition(self.lock)

    def note(self, seq: int) -> None:
        now = time.monotonic_ns()
        with self.changed:
            self.times.setdefault(seq, now)
            self.changed.notify_all()

    def wait_for(self, seq: int, timeout: float) -> int | None:
        with self.changed:
            self.changed.wait_for(lambda: seq in self.times, timeout=timeout)
            return self.times.get(seq)


def _find_seq(doc: Any) -> int | None:
    if isinstance(doc, dict):
        if isinstance(doc.get("seq"), int | float) and not isinstance(doc.get("seq"), bool):
            return int(doc["seq"])
        for value in doc.values():
            found = _find_seq(value)
            if found is not None:
                return found
    if isinstance(doc, list):
        for value in doc:
            found = _find_seq(value)
            if found is not None:
                return found
    return None


def _start_modbus(port: int, writes: Arrivals) -> threading.Thread:
    async def on_request(
        function_code: int, start: int, address: int, count: int, registers: list[int], values: Any
    ) -> None:
        if values and function_code in (6, 16) and address == 0:
            writes.note(int(values[0]))

    def serve() -> None:
        async def main() -> None:
            blocks = (
                [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
                [SimData(0, values=[0] * 16, datatype=DataType.REGISTERS)],
                [SimData(0, values=[0] * 16, datatype=DataType.REGISTERS)],
            )
            device = SimDevice(id=1, simdata=blocks, action=on_request)  # type: ignore[arg-type]
            server = ModbusTcpServer([device], address=("127.0.0.1", port))
            await server.serve_forever()

        with contextlib.suppress(Exception):
            asyncio.run(main())

    thread = threading.Thread(target=serve, name="modbus-server", daemon=True)
    thread.start()
    return thread


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    broker = Mosquitto()
    broker.start()
    workdir = Path(tempfile.mkdtemp(prefix="latency-bench-"))
    modbus_port = free_port()
    writes, publishes = Arrivals(), Arrivals()
    _start_modbus(modbus_port, writes)
    (workdir / "bench-actuator.yaml").write_text(PROFILE)
    (workdir / "rules.yaml").write_text(RULES)
    (workdir / "site.yaml").write_text(SITE.format(modbus_port=modbus_port, broker_port=broker.port))

    subscriber = paho.Client(CallbackAPIVersion.VERSION2, client_id="latency-subscriber")
    # base/{subject}: a rule publish lands under the gateway's base topic (telemetry carries a "seq" of its own)
    subscriber.on_connect = lambda c, u, f, r, p: c.subscribe("lat/bench/gwlat/probe/fired", qos=1)

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        with contextlib.suppress(orjson.JSONDecodeError):
            seq = _find_seq(orjson.loads(message.payload))
            if seq is not None:
                publishes.note(seq)

    subscriber.on_message = on_message
    subscriber.connect("127.0.0.1", broker.port)
    subscriber.loop_start()
    prober = paho.Client(CallbackAPIVersion.VERSION2, client_id="latency-prober")
    prober.connect("127.0.0.1", broker.port)
    prober.loop_start()

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = (workdir / "gateway.log").open("wb")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", str(workdir / "site.yaml"), "--data-dir", str(workdir / "data")],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    background: tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]] | None = None
    write_ms: list[float] = []
    publish_ms: list[float] = []
    missed = {"write": 0, "publish": 0}
    try:

        def probe(seq: int, timeout: float) -> tuple[int, int | None, int | None]:
            sent = time.monotonic_ns()
            prober.publish("probe/p1", orjson.dumps({"trigger": 1, "seq": seq}), qos=1)
            written = writes.wait_for(seq, timeout)
            published = publishes.wait_for(seq, timeout if written else 0.1)
            prober.publish("probe/p1", orjson.dumps({"trigger": 0, "seq": seq}), qos=1)
            time.sleep(args.gap)  # let the clear be processed on its own, before the next rising edge
            return sent, written, published

        # warm up: the gateway starts, connects to the broker and the Modbus server, and the rule fires once
        deadline = time.monotonic() + 60
        warm = 60_000
        while time.monotonic() < deadline:
            assert gateway.poll() is None, (workdir / "gateway.log").read_text()[-3000:]
            _, written, published = probe(warm, 2.0)
            warm += 1
            if written and published:
                break
        else:
            raise SystemExit("the gateway never fired the rule: " + (workdir / "gateway.log").read_text()[-3000:])
        background = start_publisher(broker.port, args.load, int(args.load * (args.probes * (args.gap + 0.2) + 30)))
        time.sleep(1.0)  # the load is flowing before the first measured probe
        for seq in range(1, args.probes + 1):
            sent, written, published = probe(seq, args.timeout)
            if written is None:
                missed["write"] += 1
            else:
                write_ms.append((written - sent) / 1e6)
            if published is None:
                missed["publish"] += 1
            else:
                publish_ms.append((published - sent) / 1e6)
            if seq % 20 == 0:
                print(
                    f"{seq} probes: write p50 {statistics.median(write_ms or [0]):.1f} ms, "
                    f"publish p50 {statistics.median(publish_ms or [0]):.1f} ms",
                    flush=True,
                )
        background_ok = background[1].poll() is None
    finally:
        if background is not None:
            for proc in background:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        gateway.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            gateway.wait(20)
        log.close()
        for client in (prober, subscriber):
            client.disconnect()
            client.loop_stop()
        broker.close()
        shutil.rmtree(workdir, ignore_errors=True)

    def summary(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"p50_ms": None, "p99_ms": None, "max_ms": None}
        return {
            "p50_ms": round(_percentile(values, 0.50), 2),
            "p99_ms": round(_percentile(values, 0.99), 2),
            "max_ms": round(max(values), 2),
        }

    return {
        "probes": args.probes,
        "background_msgs_per_s": args.load,
        "background_publisher_alive_to_the_end": background_ok,
        "write_to_modbus": summary(write_ms),
        "publish_to_subscriber": summary(publish_ms),
        "missed": missed,
        "delivery": "defaults (platform uplink: batch_size 5000, max_inflight 4)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 probes (< 1 minute)")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--load", type=float, default=1000.0, help="background sensor messages per second")
    parser.add_argument("--gap", type=float, default=0.1, help="seconds after each clear before the next probe")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each action")
    args = parser.parse_args()
    if args.quick:
        args.probes = 40
    result = run(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
