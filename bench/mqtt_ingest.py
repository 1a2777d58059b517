"""MQTT ingestion benchmark: a C publisher (mosquitto_pub) at a fixed rate -> Mosquitto -> the gateway's MQTT source
-> the durable outbox (SQLite WAL). Reports the highest rate sustained with zero loss into the outbox, the gateway
process's CPU per message, its RSS, and, in the same run, the ceiling of a bare paho subscriber (reference).

    .venv/bin/python bench/mqtt_ingest.py --quick      # < 1 minute
    .venv/bin/python bench/mqtt_ingest.py              # rate steps up to 40k msg/s
    .venv/bin/python bench/mqtt_ingest.py --qos 1 --quick   # QoS 1 end to end, PUBACKs checked

Each message carries 4 values (one JSON object, decoded by the ``json`` decoder into 4 samples). The publisher is
``mosquitto_pub -l`` fed by a separate pacing process that writes one chunk of lines every 10 ms, so neither the
pacing nor the C publisher costs the gateway process CPU. Messages are QoS 0 (the sensors' usual QoS); "lost"
counts samples that did not reach the outbox by the end of a step.

``--qos 1``: the publisher sends at QoS 1 (``mosquitto_pub -M 1000``), the gateway subscribes at QoS 1 with a
persistent session of its own per step and acknowledges each message only after its batch reached the outbox (its
default, ``ack_after_publish``). After each step the gateway stops and a plain paho client resumes the same
session: every message the broker then delivers is one the gateway received but never acknowledged, or never
received (``unacked_after_stop``). A step counts as sustained only with nothing lost, nothing duplicated in the
outbox and nothing left unacknowledged.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.mqtt.config import MqttDeviceConfig, MqttSourceConfig
from drivers.mqtt.source import MqttSource
from gateway.model import Sample
from gateway.outbox import Outbox
from tests.services import Mosquitto

TOPIC = "bench/sensor1/state"
PAYLOAD = '{"temperature":21.5,"humidity":40.1,"co2":612,"pressure":1013.2,"battery":97,"linkquality":120}'
VALUES_PER_MESSAGE = 4

# A separate process paces lines into mosquitto_pub's stdin: CHUNK lines every 10 ms.
PACER = r"""
import sys, time
rate, count, payload = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode() + b"\n"
tail = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
out = sys.stdout.buffer
tick = 0.01
per_tick = rate * tick
start = time.perf_counter()
sent = 0
while sent < count:
    due = min(count, int((time.perf_counter() - start) / tick * per_tick) + int(per_tick))
    if due > sent:
        out.write(payload * (due - sent))
        out.flush()
        sent = due
    time.sleep(tick / 2)
time.sleep(tail)  # keep stdin open: mosquitto_pub -l may still be sending (at QoS 1, awaiting PUBACKs)
"""

# The reference: a bare paho subscriber (loop_forever, a counter in on_message), in its own process.
BARE = r"""
import sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
port, count = int(sys.argv[1]), int(sys.argv[2])
qos = int(sys.argv[3]) if len(sys.argv) > 3 else 0
state = {"n": 0, "first": 0.0, "last": 0.0}
def on_message(client, userdata, message):
    if state["n"] == 0:
        state["first"] = time.perf_counter()
    state["n"] += 1
    if state["n"] >= count:
        state["last"] = time.perf_counter()
        client.disconnect()
def on_connect(client, userdata, flags, reason, properties):
    client.subscribe("bench/#", qos=qos)
client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare")
client.on_message = on_message
client.on_connect = on_connect
client.on_subscribe = lambda *a: print("ready", flush=True)
client.connect("127.0.0.1", port, keepalive=60)
client.loop_forever()
print(state["n"], state["last"] - state["first"], flush=True)
"""


def start_publisher(
    port: int, rate: float, count: int, qos: int = 0
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    tail = "1.0" if qos == 0 else "5.0"  # FIELD-NOTES: at QoS 1, -l needs its stdin open while acks come back
    pacer = subprocess.Popen(
        [sys.executable, "-c", PACER, str(rate), str(count), PAYLOAD, tail], stdout=subprocess.PIPE
    )
    command = [shutil.which("mosquitto_pub") or "mosquitto_pub", "-p", str(port), "-t", TOPIC, "-q", str(qos), "-l"]
    if qos:
        command += ["-M", "1000", "-i", f"bench-pub-{os.getpid()}-{int(rate)}"]
    pub = subprocess.Popen(command, stdin=pacer.stdout)
    assert pacer.stdout is not None
    pacer.stdout.close()
    return pacer, pub


def bare_ceiling(port: int, count: int, qos: int = 0) -> float:
    sub = subprocess.Popen(
        [sys.executable, "-c", BARE, str(port), str(count), str(qos)], stdout=subprocess.PIPE, text=True
    )
    assert sub.stdout is not None
    sub.stdout.readline()  # "ready": subscribed
    pacer, pub = start_publisher(port, 10_000_000, count, qos)  # as fast as mosquitto_pub can send
    try:
        received, seconds = sub.stdout.readline().split()
    finally:
        for proc in (pacer, pub, sub):
            proc.wait(timeout=60)
    return int(received) / float(seconds)


def thread_cpu_s(native_id: int | None) -> float:
    """CPU time of one thread of this process (on-CPU nanoseconds from /proc schedstat)."""
    if native_id is None:
        return 0.0
    return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0]) / 1e9


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unacked_in_session(port: int, client_id: str, quiet_s: float = 1.5) -> int:
    """Resume ``client_id``'s persistent session with a plain paho client and count what the broker delivers:
    messages it never got a PUBACK for (resent) and messages it still had queued. Stops after ``quiet_s`` of
    silence."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    received = [0]
    last = [time.monotonic()]

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        received[0] += 1
        last[0] = time.monotonic()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        while time.monotonic() - last[0] < quiet_s:
            time.sleep(0.1)
    finally:
        client.disconnect()
        client.loop_stop()
    return received[0]


async def gateway_step(port: int, outbox: Outbox, rate: float, seconds: float, qos: int = 0) -> dict[str, float]:
    count = int(rate * seconds)
    session: dict[str, object] = {}
    if qos:
        session = {"client_id": f"bench-gw-q{qos}-{int(rate)}-{os.getpid()}", "session": "persistent"}
    config = MqttSourceConfig.model_validate(
        {
            "id": "bench",
            "host": "127.0.0.1",
            "port": port,
            **session,
            "subscriptions": [
                {"id": "sensors", "topic": "bench/+/state", "decoder": {"type": "json"}, "qos": qos},
            ],
        }
    )
    device = MqttDeviceConfig.model_validate(
        {
            "id": "sensor1",
            "driver": "mqtt",
            "source": "bench",
            "points": {"temperature": {}, "humidity": {}, "co2": {"kind": "int"}, "pressure": {}},
        }
    )
    source = MqttSource(config, [device])
    stored_before = outbox.stats.appended_samples

    async def sink(batch: list[Sample]) -> None:
        await outbox.append(batch)

    stopping = asyncio.Event()
    task = asyncio.create_task(source.run(sink, stopping), name="bench-source")
    while not source.connected:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    loop_tid, writer_tid = threading.get_native_id(), outbox.writer_native_id
    cpu0 = time.process_time()
    loop_cpu0, writer_cpu0 = thread_cpu_s(loop_tid), thread_cpu_s(writer_tid)
    wall0 = time.perf_counter()
    pacer, pub = start_publisher(port, rate, count, qos)
    expected = count * VALUES_PER_MESSAGE
    deadline = wall0 + seconds + 5.0
    while outbox.stats.appended_samples - stored_before < expected and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    loop_cpu, writer_cpu = thread_cpu_s(loop_tid) - loop_cpu0, thread_cpu_s(writer_tid) - writer_cpu0
    per_msg = 1e6 / max(source.messages, 1)
    stopping.set()
    await task
    for proc in (pacer, pub):
        proc.wait(timeout=30)
    stored = outbox.stats.appended_samples - stored_before
    unacked = -1
    if qos:
        unacked = await asyncio.to_thread(unacked_in_session, port, str(session["client_id"]))
    return {
        "rate": rate,
        "messages": count,
        "received": source.messages,
        "stored_samples": stored,
        "lost": max(0, expected - stored),
        "duplicated_samples": max(0, stored - expected),
        "unacked_after_stop": unacked,
        "wall_s": round(wall, 2),
        "achieved_msgs_per_s": round(source.messages / max(wall, 1e-9)),
        "cpu_us_per_msg": round(cpu * per_msg, 2),
        # the same CPU split by thread: the event loop (paho, decoding, batching, encoding) and the outbox writer
        "loop_thread_us_per_msg": round(loop_cpu * per_msg, 2),
        "writer_thread_us_per_msg": round(writer_cpu * per_msg, 2),
        "loop_thread_cores": round(loop_cpu / max(wall, 1e-9), 2),
        "batches": source.batches_published,
        "paused": source.reads_paused,
    }


def _publish_packet(topic: bytes, payload: bytes) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + payload
    return bytes([0x30, len(body)]) + body  # QoS 0; these messages are < 128 bytes


async def cost_split(messages: int) -> dict[str, float]:
    """CPU per message of each stage, measured offline on the benchmark's message (thread CPU time, best of 3):
    paho's own read path (socket pair -> loop_read -> on_message), the driver's fast path (64 KiB read ->
    parse_qos0_publish), Ingest (route + JSON decode into Sample tuples), the outbox's ``encode_samples`` per batch,
    and the outbox writer thread's INSERT + COMMIT per batch."""
    import socket

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from drivers.mqtt.client import parse_qos0_publish
    from drivers.mqtt.ingest import Ingest
    from gateway.outbox import encode_samples

    packet = _publish_packet(TOPIC.encode(), PAYLOAD.encode())
    stream = packet * messages
    per_msg: dict[str, float] = {}

    def best_of_3(name: str, run: Callable[[], None]) -> None:
        times = []
        for _ in range(3):
            start = time.thread_time()
            run()
            times.append(time.thread_time() - start)
        per_msg[name] = round(min(times) / messages * 1e6, 2)

    def paho_read() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        received = 0

        def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
            nonlocal received
            received += len(message.topic) > 0

        client = paho.Client(CallbackAPIVersion.VERSION2)
        client.on_message = on_message
        client._sock = ours  # as after CONNACK: paho reads PUBLISH packets from the socket
        sent = 0
        while received < messages:
            with contextlib.suppress(BlockingIOError):
                sent += theirs.send(stream[sent : sent + 65536])
            before = -1
            while before != received:  # one packet per loop_read
                before = received
                client.loop_read()
        ours.close()
        theirs.close()

    def fast_read() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        sent = received = 0
        rest = b""
        while received < messages:
            with contextlib.suppress(BlockingIOError):
                sent += theirs.send(stream[sent : sent + 65536])
            try:
                buffer, pos = rest + ours.recv(65536), 0
            except BlockingIOError:
                continue
            while (parsed := parse_qos0_publish(buffer, pos, False)) is not None:
                pos, topic, _payload = parsed
                received += len(topic.decode()) > 0
            rest = buffer[pos:]
        ours.close()
        theirs.close()

    config = MqttSourceConfig.model_validate(
        {"id": "b", "host": "h", "subscriptions": [{"id": "s", "topic": "bench/+/state", "decoder": {"type": "json"}}]}
    )
    device = MqttDeviceConfig.model_validate(
        {
            "id": "sensor1",
            "driver": "mqtt",
            "source": "b",
            "points": {"temperature": {}, "humidity": {}, "co2": {"kind": "int"}, "pressure": {}},
        }
    )
    ingest = Ingest(config, [device])
    payload = PAYLOAD.encode()
    out: list[Sample] = []

    def decode() -> None:
        out.clear()
        now = time.time_ns()
        for _ in range(messages):
            ingest.ingest(TOPIC, payload, now, out)

    best_of_3("paho_read_path", paho_read)
    best_of_3("fast_read_path", fast_read)
    best_of_3("ingest_decode", decode)
    batch_messages = 1000  # about one flush's worth at 20k msg/s (batch_linger 5 ms ... pending while committing)
    batches = [out[i : i + batch_messages * VALUES_PER_MESSAGE] for i in range(0, len(out), batch_messages * 4)]

    def encode() -> None:
        for batch in batches:
            encode_samples(batch)

    best_of_3("outbox_encode", encode)
    workdir = Path(tempfile.mkdtemp(prefix="mqtt-split-"))
    try:
        outbox = Outbox(workdir / "outbox.db")
        writer = outbox.writer_native_id
        before = thread_cpu_s(writer)
        for batch in batches:
            await outbox.append(batch)
        per_msg["outbox_writer_commit"] = round((thread_cpu_s(writer) - before) / messages * 1e6, 2)
        await outbox.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return per_msg


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    if args.split:
        split = await cost_split(args.split_messages)
        for stage, cost in split.items():
            print(f"{stage:>22}: {cost:6.2f} us/msg", flush=True)
        return {"cost_split_us_per_msg": split, "messages": args.split_messages}
    broker = Mosquitto()
    broker.start()
    workdir = Path(tempfile.mkdtemp(prefix="mqtt-bench-"))
    try:
        ceiling = bare_ceiling(broker.port, args.bare_messages, args.qos)
        print(f"bare paho subscriber ceiling: {ceiling:,.0f} msg/s ({args.bare_messages} messages)", flush=True)
        outbox = Outbox(workdir / "outbox.db")
        steps = []
        try:
            for rate in args.rates:
                step = await gateway_step(broker.port, outbox, rate, args.seconds, args.qos)
                steps.append(step)
                print(json.dumps(step), flush=True)
        finally:
            await outbox.close()
        # sustained: nothing lost, and everything stored within 10% (+0.5 s of start/stop) of the sending time,
        # i.e. the gateway kept pace instead of draining a backlog afterwards
        sustained = [
            s
            for s in steps
            if s["lost"] == 0
            and s["duplicated_samples"] == 0
            and s["unacked_after_stop"] <= 0
            and s["wall_s"] <= args.seconds * 1.1 + 0.5
        ]
        best = max(sustained, key=lambda s: s["rate"]) if sustained else None
        return {
            "sustained_msgs_per_s": int(best["rate"]) if best else 0,
            "lost": int(best["lost"]) if best else int(steps[-1]["lost"]),
            "lost_total_all_steps": int(sum(s["lost"] for s in steps)),
            "cpu_us_per_msg": best["cpu_us_per_msg"] if best else None,
            "rss_mib": round(rss_mib(), 1),
            "bare_client_msgs_per_s": round(ceiling),
            "ratio_to_bare": round(best["rate"] / ceiling, 2) if best else 0,
            "values_per_msg": VALUES_PER_MESSAGE,
            "qos": args.qos,
            "unacked_after_stop_all_steps": int(sum(max(0, s["unacked_after_stop"]) for s in steps)),
            "duplicated_samples_all_steps": int(sum(s["duplicated_samples"] for s in steps)),
            "loop": "uvloop" if args.uvloop else "asyncio",
            "loop_thread_us_per_msg": best["loop_thread_us_per_msg"] if best else None,
            "writer_thread_us_per_msg": best["writer_thread_us_per_msg"] if best else None,
            "steps": [
                {
                    k: s[k]
                    for k in (
                        "rate",
                        "lost",
                        "duplicated_samples",
                        "unacked_after_stop",
                        "cpu_us_per_msg",
                        "loop_thread_us_per_msg",
                        "wall_s",
                    )
                }
                for s in steps
            ],
        }
    finally:
        broker.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two rate steps of 4 s each (< 1 minute)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each rate step")
    parser.add_argument("--rates", type=float, nargs="*", default=[10_000, 20_000, 25_000, 30_000, 35_000, 40_000])
    parser.add_argument("--bare-messages", type=int, default=300_000)
    parser.add_argument("--no-uvloop", dest="uvloop", action="store_false")
    parser.add_argument("--split", action="store_true", help="only measure the CPU per message of each stage offline")
    parser.add_argument("--split-messages", type=int, default=100_000)
    parser.add_argument("--qos", type=int, choices=[0, 1], default=0, help="publish and subscribe at this QoS")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 4.0
        args.rates = [20_000, 25_000]
        args.bare_messages = 150_000
    if args.uvloop:
        import uvloop

        uvloop.install()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    result = asyncio.run(main_async(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
