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
        assert fleet.receivers[0].kills == [-9]  # it was running when SIGKILL came
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


async def test_a_tsdb_outage_holds_the_acks_and_loses_nothing(
    tmp_path: Path, broker: Mosquitto, dedup_tsdb: DedupVictoriaMetrics
) -> None:
    """VictoriaMetrics stopped mid-run: the receivers retry the write, acknowledge nothing meanwhile, say so once
    each, and when it is back every sample arrives once."""
    fleet = Fleet(
        tmp_path,
        gateways=4,
        ports=[broker.port],
        receiver_args=["--mqtt", f"127.0.0.1:{broker.port}", "--tsdb", dedup_tsdb.url, "--batch", "40"],
        prefix="outage",
        mqtt_client_ids=True,
    )
    fleet.start_receivers()
    stopping = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tg:
            for identity in fleet.identities:
                tg.create_task(identity.run(stopping))
            at_stop: list[int] = []

            def stop_tsdb() -> None:
                dedup_tsdb.stop()
                at_stop.append(read_report(fleet.db)["counters"].get("telemetry", 0))

            await fleet.drive(40, interval=0.05, incentive_every=8, at_round={10: stop_tsdb})
            # while the TSDB is down nothing more is committed than the batches that had written before the stop
            # (at most one batch of 40 per receiver)
            during = read_report(fleet.db)["counters"].get("telemetry", 0)
            reads, _samples, _records = fleet.committed()
            assert during - at_stop[0] <= 2 * 40 and during < reads
            dedup_tsdb.start()
            await fleet.wait_caught_up(timeout=90)
            stopping.set()
        report = read_report(fleet.db)
        assert report["counters"]["telemetry"] == reads and report["gaps"] == 0
        assert await settled_exactly_once(fleet.identities, fleet.db, dedup_tsdb) == {"lost": 0, "duplicated": 0}
        for receiver in fleet.receivers:
            text = receiver.log.read_text()
            assert text.count("retrying, nothing acknowledged meanwhile") <= 1, text
        assert sum("the TSDB takes writes again" in r.log.read_text() for r in fleet.receivers) >= 1
    finally:
        await fleet.close()
