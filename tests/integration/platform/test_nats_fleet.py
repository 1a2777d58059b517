"""The platform side at city shape, with real components: a three-node NATS cluster (JetStream, MQTT on every node),
gateway identities publishing through the real platform uplink to different nodes, two receiver processes sharing
one durable consumer, VictoriaMetrics. Mid-run a receiver is killed with SIGKILL and started again, and a NATS node
is killed and started again. Then: every committed sample is in the TSDB once, every incentive record in the
verified ledger once, telemetry seq gaps are zero; and bad input sent afterwards is quarantined, never stored."""

from __future__ import annotations

import asyncio
import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from gateway.incentives.record import epoch_id, record_hash, sign
from tests.platform_services import (
    DedupVictoriaMetrics,
    Fleet,
    NatsCluster,
    read_report,
    settled_exactly_once,
    tsdb_samples,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster() -> Iterator[NatsCluster]:
    if shutil.which("nats-server") is None:
        pytest.fail("nats-server is not installed: run the README's test command, which installs it")
    nats = NatsCluster()
    nats.start()
    try:
        yield nats
    finally:
        nats.close()


@pytest.fixture
def dedup_tsdb() -> Iterator[DedupVictoriaMetrics]:
    tsdb = DedupVictoriaMetrics()
    tsdb.start()
    try:
        yield tsdb
    finally:
        tsdb.close()


def publish(port: int, messages: list[tuple[str, bytes]]) -> None:
    """QoS 1, waiting for every PUBACK: what a misbehaving or hostile client sends."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="intruder")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def event(record: dict[str, Any]) -> bytes:
    return orjson.dumps({"v": 1, "id": record["id"], "type": "incentive", "subject": record["id"], "ts": 1,
                         "body": record})  # fmt: skip


def bad_input(fleet: Fleet) -> list[tuple[str, bytes]]:
    victim = fleet.identities[0]
    base = f"city/{victim.site}/{victim.gateway}"
    last = victim.chain.records[-1]
    # the next record, but changed after signing: a forged signature
    forged_next = copy.deepcopy(last)
    forged_next.update(seq=last["seq"] + 1, prev_hash=record_hash(last), epoch=last["epoch"] + 1,
                       id=epoch_id(victim.gateway, last["epoch"] + 1))  # fmt: skip
    # a record already in the ledger, rewritten and signed by another key: a replay with other content
    replayed = copy.deepcopy(victim.chain.records[0])
    replayed["reason"] = "paid twice"
    replayed["signature"] = sign({k: v for k, v in replayed.items() if k != "signature"}, Ed25519PrivateKey.generate())
    first_ts = victim.committed_ts[0]
    return [
        (f"{base}/telemetry/m1", b'{"v": 1, "seq": "one", "ts": 1, "values": {}}'),  # schema
        (f"{base}/telemetry/m1", orjson.dumps({"v": 1, "seq": 1, "ts": first_ts, "values": {"power_kw": 999999.0}})),
        (f"{base}/events/incentive", event(forged_next)),
        (f"{base}/events/incentive", event(replayed)),
    ]


async def test_exactly_once_through_a_receiver_kill_and_a_node_kill(
    tmp_path: Path, cluster: NatsCluster, dedup_tsdb: DedupVictoriaMetrics
) -> None:
    fleet = Fleet(
        tmp_path,
        gateways=6,
        ports=[node.mqtt_port for node in cluster.nodes],
        receiver_args=[
            *(a for url in cluster.urls for a in ("--nats", url)),
            *("--tsdb", dedup_tsdb.url, "--ack-wait", "2", "--batch", "40"),
        ],
    )
    fleet.start_receivers()
    stopping = asyncio.Event()
    victim_node = cluster.nodes[2]
    try:
        async with asyncio.TaskGroup() as tg:
            for identity in fleet.identities:
                tg.create_task(identity.run(stopping))
            await fleet.drive(
                60,
                interval=0.05,
                incentive_every=6,
                at_round={
                    15: fleet.receivers[0].kill,
                    20: victim_node.kill,
                    30: fleet.receivers[0].start,
                    40: victim_node.start,
                },
            )
            await fleet.wait_caught_up(timeout=120)
            stopping.set()
        assert all(r.proc is not None and r.proc.poll() is None for r in fleet.receivers)
        assert fleet.receivers[0].kills == [-9]  # it was running when SIGKILL came
        report = read_report(fleet.db)
        reads, samples, records = fleet.committed()
        assert report["counters"]["telemetry"] == reads
        assert report["counters"]["samples"] == samples
        assert report["counters"]["incentive"] == records
        assert report["gaps"] == 0
        assert report["quarantine"] == {}, report["recent_quarantine"]
        for identity in fleet.identities:
            entry = report["gateways"][f"{identity.site}/{identity.gateway}"]
            assert entry["telemetry"] == {"first_seq": 1, "last_seq": identity.reads, "gaps": 0}
            assert entry["incentive"]["head_seq"] == len(identity.chain.records)
            assert entry["incentive"]["checkpoint_matches"] is True
        assert await settled_exactly_once(fleet.identities, fleet.db, dedup_tsdb) == {"lost": 0, "duplicated": 0}

        # bad input afterwards, through another node: quarantined with its reason, never stored
        publish(cluster.nodes[1].mqtt_port, bad_input(fleet))
        for _ in range(400):
            report = read_report(fleet.db)
            if report["counters"].get("quarantined", 0) >= 4:
                break
            await asyncio.sleep(0.05)
        assert report["quarantine"] == {"schema": 1, "replay": 2, "signature": 1}, report["recent_quarantine"]
        reasons = sorted(q["reason"] for q in report["recent_quarantine"])
        assert any("bad signature" in r for r in reasons)
        assert any("ledger holds another record" in r for r in reasons)
        assert any("already received with other content" in r for r in reasons)
        assert report["counters"]["incentive"] == records
        assert all(value != 999999.0 for series in tsdb_samples(dedup_tsdb).values() for _ts, value in series)
        assert await settled_exactly_once(fleet.identities, fleet.db, dedup_tsdb) == {"lost": 0, "duplicated": 0}
    finally:
        victim_node.start()
        await fleet.close()
