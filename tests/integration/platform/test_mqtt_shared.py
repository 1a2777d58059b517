"""The receiver on a single-site broker: two receiver processes on one Mosquitto shared subscription
(``$share/<group>/city/#``), each with its own persistent session, gateway identities publishing through the real
platform uplink. One receiver is killed with SIGKILL mid-run and started again with the same client id: what it held
unacked comes back from its session. Every committed sample is in the TSDB once, every incentive record in the
ledger once, and a schema violation is quarantined."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.platform.test_nats_fleet import publish
from tests.platform_services import DedupVictoriaMetrics, Fleet, read_report, settled_exactly_once
from tests.services import Mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def dedup_tsdb() -> Iterator[DedupVictoriaMetrics]:
    tsdb = DedupVictoriaMetrics()
    tsdb.start()
    try:
        yield tsdb
    finally:
        tsdb.close()


async def test_two_receivers_on_a_shared_subscription_through_a_sigkill(
    tmp_path: Path, broker: Mosquitto, dedup_tsdb: DedupVictoriaMetrics
) -> None:
    fleet = Fleet(
        tmp_path,
        gateways=4,
        ports=[broker.port],
        receiver_args=["--mqtt", f"127.0.0.1:{broker.port}", "--tsdb", dedup_tsdb.url, "--batch", "40"],
        prefix="shared",
        mqtt_client_ids=True,
    )
    fleet.start_receivers()
    stopping = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tg:
            for identity in fleet.identities:
                tg.create_task(identity.run(stopping))
            await fleet.drive(
                50,
                interval=0.05,
                incentive_every=5,
                at_round={15: fleet.receivers[0].kill, 30: fleet.receivers[0].start},
            )
            await fleet.wait_caught_up(timeout=90)
            stopping.set()
        report = read_report(fleet.db)
        reads, samples, records = fleet.committed()
        assert (report["counters"]["telemetry"], report["counters"]["samples"]) == (reads, samples)
        assert report["counters"]["incentive"] == records
        assert report["gaps"] == 0
        assert report["quarantine"] == {}, report["recent_quarantine"]
        assert await settled_exactly_once(fleet.identities, fleet.db, dedup_tsdb) == {"lost": 0, "duplicated": 0}

        victim = fleet.identities[1]
        publish(broker.port, [(f"shared/{victim.site}/{victim.gateway}/telemetry/m1", b'{"v": 1, "seq": -1}')])
        for _ in range(400):
            report = read_report(fleet.db)
            if report["quarantine"]:
                break
            await asyncio.sleep(0.05)
        assert report["quarantine"] == {"schema": 1}
        assert report["counters"]["telemetry"] == reads
    finally:
        await fleet.close()
