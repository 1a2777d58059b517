"""The platform side's real services and traffic for tests and bench/fleet.py.

``NatsCluster``: three Debian ``nats-server`` processes on loopback ports, clustered, JetStream on each, MQTT on each
(MQTT needs JetStream and a ``server_name`` on every node: FIELD-NOTES.md). A node can be killed (SIGKILL) and
started again on the same ports and store.

``GatewayIdentity``: one simulated gateway as the platform sees it: a site file, an outbox and the real platform
uplink (``gateway.uplinks.mqtt.MqttUplink`` through ``build_uplinks``: the same code a gateway runs), an Ed25519
signing key whose public half is written where the receiver looks for it, and a chain of real signed incentive
records (epoch records, built and signed with ``gateway.incentives.record``) that it appends as ``incentive`` events,
with a signed checkpoint of the chain head.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt_client
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.config.site import load_site
from gateway.incentives.record import (
    SCHEMA_ID,
    epoch_id,
    key_id,
    make_checkpoint,
    programme_hash,
    record_hash,
    sign,
)
from gateway.model import Event, Quality, Sample
from gateway.outbox import Outbox
from gateway.uplinks.runner import UplinkRunner, build_uplinks
from tests.services import VictoriaMetrics, free_port, wait_for_port

#: points of the simulator's energy meter profile that every simulated poll reads
POINTS = ("power_kw", "energy_kwh", "voltage", "current")
FAST_DELIVERY = "{batch_size: 500, live_window: 0.5s, retry_min: 0.05s, retry_max: 0.5s, timeout: 3s}"


class NatsNode:
    def __init__(self, name: str, directory: Path, cluster_ports: list[int]) -> None:
        self.name = name
        self.dir = directory
        self.client_port = free_port()
        self.mqtt_port = free_port()
        self.cluster_ports = cluster_ports
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / f"{name}.log"

    def write_conf(self, cluster_port: int) -> Path:
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.cluster_ports)
        conf = self.dir / f"{self.name}.conf"
        conf.write_text(
            f"server_name: {self.name}\n"
            f"listen: 127.0.0.1:{self.client_port}\n"
            f"jetstream {{ store_dir: {self.dir / ('js-' + self.name)} }}\n"
            f"cluster {{ name: c1, listen: 127.0.0.1:{cluster_port}, routes: [{routes}] }}\n"
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port} }}\n"
        )
        return conf

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        conf = self.dir / f"{self.name}.conf"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [shutil.which("nats-server") or "/usr/sbin/nats-server", "-c", str(conf)], stdout=log, stderr=log
            )
        wait_for_port(self.client_port, timeout=20)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"


class NatsCluster:
    """Three nodes; ``wait_ready`` returns once JetStream has a meta leader (streams can be created)."""

    def __init__(self, size: int = 3) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="nats-cluster-"))
        cluster_ports = [free_port() for _ in range(size)]
        self.nodes = [NatsNode(f"n{i + 1}", self.dir, cluster_ports) for i in range(size)]
        for node, port in zip(self.nodes, cluster_ports, strict=True):
            node.write_conf(port)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            wait_for_port(node.mqtt_port, timeout=30)
        self.wait_ready()
        self.wake_mqtt()

    def wake_mqtt(self, timeout: float = 60.0) -> None:
        """One MQTT connection, so the MQTT side creates its streams ($MQTT_msgs among them: the receivers source
        from it). On a fresh cluster the first CONNECT can time out while those streams are being placed."""
        from paho.mqtt.enums import CallbackAPIVersion

        deadline = time.monotonic() + timeout
        while True:
            client = mqtt_client.Client(CallbackAPIVersion.VERSION2, client_id="fixture-wake")
            try:
                client.connect("127.0.0.1", self.nodes[0].mqtt_port, keepalive=10)
                client.loop_start()
                connected = time.monotonic() + 10
                while not client.is_connected() and time.monotonic() < connected:
                    time.sleep(0.05)
                if client.is_connected():
                    return
            except OSError:
                pass
            finally:
                client.disconnect()
                client.loop_stop()
            if time.monotonic() > deadline:
                raise TimeoutError("NATS's MQTT side did not accept a connection")
            time.sleep(0.5)

    def wait_ready(self, timeout: float = 60.0) -> None:
        # in a thread of its own: callers may be inside an event loop (asyncio.run refuses to nest)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, self._wait_meta_leader(timeout)).result()

    async def _wait_meta_leader(self, timeout: float) -> None:
        import nats

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                nc = await nats.connect(servers=self.urls, connect_timeout=2, max_reconnect_attempts=2)
                try:
                    await nc.jetstream(timeout=2).account_info()
                    return
                finally:
                    await nc.close()
            except Exception as exc:  # any failure means: not ready yet
                last = exc
                await asyncio.sleep(0.5)
        raise TimeoutError(f"NATS JetStream not ready: {last}")

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- traffic ------------------------------------------------------------------------------------------------------


def programme_body(variant: int) -> dict[str, Any]:
    """A valid programme (docs/incentives.md); ``variant`` changes it, so each epoch has its own programme hash."""
    return {
        "interval_s": 900,
        "max_gap_s": 300,
        "settle_s": 60,
        "max_delay_s": 3600,
        "max_clock_skew_s": 300,
        "netting": "day",
        "timezone": "UTC",
        "resolution_share": "0.1",
        "exclude_dates": [f"2026-{1 + variant % 12:02d}-{1 + variant % 28:02d}"],
        "emission_factor": {"kg_per_kwh": "0.5703", "by_time_of_day": []},
        "pseudonym_key": "0123456789abcdef",
        "accounts": [
            {
                "account": "acct_" + "b" * 32,
                "baseline": {"method": "fixed", "kwh": "0.300000"},
                "meters": [
                    {
                        "meter": "meter_" + "b" * 16,
                        "limit_w": 40000,
                        "wrap_kwh": None,
                        "resolution_kwh": "0.001000",
                        "replacements": [],
                    }
                ],
            }
        ],
    }


class IncentiveChain:
    """A gateway's signed record chain: epoch records 1..n (each a new programme), as the ledger would issue them."""

    def __init__(self, *, site: str, gateway: str, key: Ed25519PrivateKey) -> None:
        self.site, self.gateway, self.key = site, gateway, key
        self.records: list[dict[str, Any]] = []

    def next(self) -> dict[str, Any]:
        number = len(self.records) + 1
        body = programme_body(number)
        previous = self.records[-1]["programme"] if self.records else None
        record: dict[str, Any] = {
            "schema": SCHEMA_ID,
            "kind": "epoch",
            "id": epoch_id(self.gateway, number),
            "seq": number,
            "prev_hash": record_hash(self.records[-1]) if self.records else "0" * 64,
            "gateway": self.gateway,
            "site": self.site,
            "epoch": number,
            "programme": programme_hash(body),
            "key_id": key_id(self.key.public_key()),
            "programme_body": body,
            "previous_programme": previous,
            "reason": "genesis" if number == 1 else "new programme",
        }
        record["signature"] = sign(record, self.key)
        self.records.append(record)
        return record

    def checkpoint(self) -> dict[str, Any]:
        last = self.records[-1]
        return make_checkpoint(
            gateway=self.gateway, site=self.site, epoch=last["epoch"], seq=last["seq"],
            head_hash=record_hash(last), ts_ns=time.time_ns(), private_key=self.key,
        )  # fmt: skip


def write_public_key(keys_dir: Path, site: str, gateway: str, key: Ed25519PrivateKey) -> Path:
    path = keys_dir / site / f"{gateway}.pub.pem"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path


class GatewayIdentity:
    """One building's gateway, reduced to what the platform sees: the real outbox and platform uplink."""

    def __init__(
        self, directory: Path, *, site: str, gateway: str, host: str, port: int, prefix: str, keys_dir: Path
    ) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.site, self.gateway, self.prefix = site, gateway, prefix
        self.key = Ed25519PrivateKey.generate()
        write_public_key(keys_dir, site, gateway, self.key)
        self.chain = IncentiveChain(site=site, gateway=gateway, key=self.key)
        site_file = directory / "site.yaml"
        site_file.write_text(
            "version: 1\n"
            f"gateway: {{id: {gateway}, site: {site}}}\n"
            "http: {enabled: false}\n"
            "devices:\n"
            "  - {id: m1, driver: simulator, profile: sim-energy-meter, seed: 1, poll: 1s}\n"
            "uplinks:\n"
            f"  platform: {{host: 127.0.0.1, port: {port}, prefix: {prefix}, client_id: fleet-{site}-{gateway}, "
            f"delivery: {FAST_DELIVERY}}}\n"
        )
        self.site_config = load_site(site_file)
        self.outbox = Outbox(directory / "outbox.db")
        self.runner: UplinkRunner | None = None
        #: what was committed to the outbox: telemetry (seq, ts ms) per read, and incentive record ids
        self.reads = 0
        self.samples = 0
        #: the read times (ms) committed to the outbox, in order
        self.committed_ts: list[int] = []
        self.committed_set: set[int] = set()

    async def run(self, stopping: asyncio.Event) -> None:
        from tests.integration.uplinks.common import CommandRecorder

        (self.runner,) = build_uplinks(self.site_config, self.outbox, commands=CommandRecorder())
        await self.runner.run(stopping)

    async def poll(self, ts_ms: int) -> None:
        """One device read committed to the outbox (what a poll does): the profile's four points."""
        ts = ts_ms * 1_000_000
        value = float(ts_ms % 100_000)
        samples = [Sample(f"m1.{name}", value + i, ts, Quality.GOOD) for i, name in enumerate(POINTS)]
        await self.outbox.append(samples)
        self.committed_ts.append(ts_ms)
        self.committed_set.add(ts_ms)
        self.reads += 1
        self.samples += len(samples)

    async def issue_incentive(self, ts_ms: int) -> dict[str, Any]:
        record = self.chain.next()
        ts = ts_ms * 1_000_000
        checkpoint = self.chain.checkpoint()
        await self.outbox.append_events(
            [
                Event(record["id"], "incentive", record["id"], ts, record),
                Event(f"checkpoint@{record['seq']}", "incentive_checkpoint", "chain", ts, checkpoint),
            ]
        )
        return record

    def delivered(self) -> bool:
        """Everything in the outbox acknowledged by the broker."""
        if self.runner is None:
            return False
        with contextlib.suppress(Exception):
            status = self.runner.status()
            return bool(status.get("backlog_samples", 1) == 0 and status.get("backlog_events", 1) == 0)
        return False

    async def close(self) -> None:
        await self.outbox.close()


class DedupVictoriaMetrics(VictoriaMetrics):
    """VictoriaMetrics that keeps one sample per series and timestamp (``-dedup.minScrapeInterval=1ms``), as
    InfluxDB does by design: a rewrite of the same point after a receiver crash is the same point."""

    def command(self) -> list[str]:
        return [*super().command(), "-dedup.minScrapeInterval=1ms"]


# -- a fleet run: receivers, gateway identities, traffic, faults, and the exactly-once check -------------------------


class ReceiverProcess:
    """``edge-gateway platform receive`` as its own process (SIGKILL must be a real kill)."""

    def __init__(self, name: str, args: list[str], directory: Path) -> None:
        self.name, self.args = name, args
        self.log = directory / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills: list[int] = []

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "platform", "receive", *self.args], stdout=log, stderr=log
            )

    def wait_receiving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while "platform: receiving" not in self.log.read_text(errors="replace"):
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start; log:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        #: exit statuses of the kills (-9: it was running and SIGKILL ended it)
        self.kills.append(self.proc.wait())

    def cpu_seconds(self) -> float:
        """user + system CPU so far (Linux /proc), 0 once it has exited."""
        assert self.proc is not None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc is not None else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def read_report(db: Path) -> dict[str, Any]:
    from gateway.platform.progress import Progress

    progress = Progress(db, keys=lambda _gateway: None)
    try:
        report = progress.report()
        report["p99_ms"] = progress.latency_percentile(0.99)
        report["ledger"] = {
            gateway: [orjson.loads(raw) for (raw,) in progress.db.execute(
                "SELECT record FROM ledger WHERE gateway=? ORDER BY seq", (gateway,)
            )]
            for (gateway,) in progress.db.execute("SELECT DISTINCT gateway FROM ledger")
        }  # fmt: skip
        report["recent_quarantine"] = progress.quarantined(1000)
        return report
    finally:
        progress.close()


def tsdb_samples(tsdb: VictoriaMetrics) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(site/gateway, field) -> [(ts ms, value)] as the TSDB holds them (every sample, sorted)."""
    out: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for series in tsdb.export('{__name__=~"platform_.*"}'):
        metric = series["metric"]
        assert isinstance(metric, dict)
        key = (f"{metric['site']}/{metric['gateway']}", str(metric["__name__"]).removeprefix("platform_"))
        values, stamps = series["values"], series["timestamps"]
        assert isinstance(values, list) and isinstance(stamps, list)
        out.setdefault(key, []).extend(zip(stamps, values, strict=True))
    for samples in out.values():
        samples.sort()
    return out


def exactly_once_problems(
    identities: list[GatewayIdentity], report: dict[str, Any], tsdb: VictoriaMetrics
) -> dict[str, int]:
    """lost and duplicated samples at the TSDB plus incentive records at the ledger, against what each identity
    committed to its outbox (``committed``: ts ms -> value of the first point, the rest derived from it)."""
    samples = tsdb_samples(tsdb)
    lost = duplicated = 0
    for identity in identities:
        name = f"{identity.site}/{identity.gateway}"
        for i, point in enumerate(POINTS):
            expected = sorted((ts, float(ts % 100_000) + i) for ts in identity.committed_ts)
            got = samples.get((name, point), [])
            seen: dict[int, int] = {}
            for ts, value in got:
                seen[ts] = seen.get(ts, 0) + 1
                if ts not in identity.committed_set or value != float(ts % 100_000) + i:
                    duplicated += 1  # a sample nobody committed counts against the receiver too
            missing = [ts for ts, _ in expected if ts not in seen]
            lost += len(missing)
            if missing and os.environ.get("FLEET_DEBUG"):
                print("missing", name, point, missing, "committed", identity.committed_ts[:3], "...")
            duplicated += sum(n - 1 for n in seen.values() if n > 1)
        ledger = report["ledger"].get(name, [])
        lost += sum(1 for r in identity.chain.records if r not in ledger)
        duplicated += len(ledger) - len({r["seq"] for r in ledger})
    return {"lost": lost, "duplicated": duplicated}


class Fleet:
    """Gateway identities publishing through broker ports, receivers sharing the work, faults on a schedule."""

    def __init__(
        self,
        work: Path,
        *,
        gateways: int,
        ports: list[int],
        receiver_args: list[str],
        receivers: int = 2,
        prefix: str = "city",
        mqtt_client_ids: bool = False,
    ) -> None:
        self.work, self.prefix = work, prefix
        self.keys = work / "keys"
        self.db = work / "receiver" / "progress.db"
        self.identities = [
            GatewayIdentity(
                work / f"gw{i:03d}", site=f"site{i % 7}", gateway=f"gw{i:03d}", host="127.0.0.1",
                port=ports[i % len(ports)], prefix=prefix, keys_dir=self.keys,
            )
            for i in range(gateways)
        ]  # fmt: skip
        common = ["--db", str(self.db), "--keys", str(self.keys), "--prefix", prefix, *receiver_args]
        self.receivers = [
            ReceiverProcess(
                f"receiver{n}", [*common, *(["--client-id", f"receiver{n}"] if mqtt_client_ids else [])], work
            )
            for n in range(receivers)
        ]
        self.started = time.monotonic()

    def start_receivers(self) -> None:
        """Start every receiver and wait until each holds its subscription (the line ``platform: receiving``):
        what a broker gets before anyone subscribed is not kept for a subscriber that comes later."""
        for receiver in self.receivers:
            receiver.start()
        for receiver in self.receivers:
            receiver.wait_receiving()

    async def drive(
        self, rounds: int, *, interval: float, incentive_every: int = 10, at_round: dict[int, Any] | None = None
    ) -> None:
        """``rounds`` polls per identity, an incentive record every ``incentive_every``; ``at_round`` maps a round
        to a callable run before it (the faults)."""
        start_ms = int(time.time() * 1000)
        for n in range(rounds):
            action = (at_round or {}).get(n)
            if action is not None:
                action()
            ts = start_ms + n * max(1, int(interval * 1000))
            for identity in self.identities:
                await identity.poll(ts)
                if n % incentive_every == incentive_every - 1:
                    await identity.issue_incentive(ts)
            await asyncio.sleep(interval)

    def committed(self) -> tuple[int, int, int]:
        """(telemetry messages, samples, incentive records) committed to the outboxes."""
        return (
            sum(i.reads for i in self.identities),
            sum(i.samples for i in self.identities),
            sum(len(i.chain.records) for i in self.identities),
        )

    def caught_up(self) -> bool:
        reads, _samples, records = self.committed()
        report = read_report(self.db) if self.db.exists() else {"counters": {}}
        counters = report["counters"]
        return bool(counters.get("telemetry", 0) >= reads and counters.get("incentive", 0) >= records)

    async def wait_caught_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.caught_up():
            if time.monotonic() > deadline:
                states = [(i.gateway, i.runner.status() if i.runner is not None else None) for i in self.identities]
                raise AssertionError(
                    f"receivers did not catch up: uplinks {states}, committed {self.committed()}, "
                    f"report {read_report(self.db)['counters'] if self.db.exists() else None}"
                )
            await asyncio.sleep(0.25)

    def stop_receivers(self) -> list[int]:
        return [r.stop() for r in self.receivers]

    async def close(self) -> None:
        for receiver in self.receivers:
            receiver.stop()
        for identity in self.identities:
            await identity.close()


async def settled_exactly_once(
    identities: list[GatewayIdentity], db: Path, tsdb: VictoriaMetrics, timeout: float = 30.0
) -> dict[str, int]:
    """``exactly_once_problems`` once nothing is lost, or after ``timeout``: VictoriaMetrics answered the last writes
    (204) before the receivers committed them, but can take a few seconds more to show them in an export."""
    deadline = time.monotonic() + timeout
    while True:
        result = exactly_once_problems(identities, read_report(db), tsdb)
        if result["lost"] == 0 or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.5)
