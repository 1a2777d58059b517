"""Group commit (issue 19): sources hand polls on without waiting for each commit, and the store loop commits what
queued meanwhile in one transaction, in order, once; the sink still answers each batch only after its commit."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from gateway.config.site import Site, load_site
from gateway.driver_api import BatchSink, DeviceStatus, PublishAhead
from gateway.model import Command, Sample
from gateway.outbox import Outbox
from gateway.supervisor import STORE_GROUP_SAMPLES, Gateway


def _probe_site(tmp_path: Path) -> Site:
    path = tmp_path / "site.yaml"
    path.write_text("version: 1\ngateway: {id: gw1, site: lab}\nhttp: {enabled: false}\n")
    return load_site(path)


class HandingSource:
    """Hands ``count`` batches of ``size`` samples on through PublishAhead, as a Modbus poll loop does."""

    name = "handing"
    devices = frozenset({"probe"})

    def __init__(self, count: int, size: int) -> None:
        self.count, self.size = count, size
        self.handed: list[float] = []
        self.sink_said: list[bool | None] = []
        self.done = asyncio.Event()
        self.go = asyncio.Event()

    async def run(self, publish: BatchSink, stopping: asyncio.Event) -> None:
        await self.go.wait()

        async def recording(batch: list[Sample]) -> bool | None:
            said = await publish(batch)
            self.sink_said.append(said)
            return said

        ahead = PublishAhead(recording, limit=self.count)
        for i in range(self.count):
            values = [float(i * self.size + j) for j in range(self.size)]
            self.handed.extend(values)
            await ahead.hand([Sample("probe.value", v, time.time_ns()) for v in values])
        await ahead.drain()
        self.done.set()
        await stopping.wait()

    async def write(self, command: Command) -> None:
        raise NotImplementedError

    def status(self) -> list[DeviceStatus]:
        return []


async def _rows(path: Path) -> list[list[float]]:
    outbox = Outbox(path)
    try:
        return [[s.value for s in b.samples] for b in outbox.read_telemetry(0, limit=1_000_000)]  # type: ignore[misc]
    finally:
        await outbox.close()


@pytest.mark.parametrize(("count", "size"), [(40, 25), (12, STORE_GROUP_SAMPLES // 3 + 1)])
async def test_what_queues_during_a_transaction_is_committed_in_one_in_order_and_once(
    tmp_path: Path, count: int, size: int
) -> None:
    source = HandingSource(count, size)
    gateway = Gateway(_probe_site(tmp_path), data_dir=tmp_path / "data", sources=[source])
    stop = asyncio.Event()
    # another connection holds the database's write lock (a real SQLite lock, as a long checkpoint would): the
    # writer's first transaction waits, and the source's batches queue behind it on the bus
    runner = asyncio.ensure_future(gateway.run(stop))
    await asyncio.wait_for(gateway.started.wait(), 5)
    blocker = sqlite3.connect(tmp_path / "data" / "outbox.db", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    source.go.set()
    await asyncio.sleep(0.3)
    assert not source.done.is_set()  # nothing can be committed: the source is waiting for its batches' commits
    blocker.execute("ROLLBACK")
    blocker.close()
    await asyncio.wait_for(source.done.wait(), 10)
    stop.set()
    await asyncio.wait_for(runner, 5)

    rows = await _rows(tmp_path / "data" / "outbox.db")
    assert [v for row in rows for v in row] == source.handed  # every value, in order, once
    assert len(rows) < count  # grouped: fewer transactions (rows) than polls
    assert all(len(row) <= max(STORE_GROUP_SAMPLES, size) for row in rows)  # a group never exceeds its budget
    assert source.sink_said == [True] * count  # each batch answered only after its commit


async def test_publish_ahead_keeps_order_bounds_what_is_outstanding_and_drains() -> None:
    entered: list[int] = []
    release = asyncio.Event()
    peak = 0
    ahead: PublishAhead

    async def sink(batch: list[Sample]) -> bool:
        nonlocal peak
        entered.append(batch[0].ts)
        peak = max(peak, len(ahead))
        await release.wait()
        return True

    ahead = PublishAhead(sink, limit=3)
    for i in range(3):
        await ahead.hand([Sample("d.p", 1.0, i)])
    fourth = asyncio.ensure_future(ahead.hand([Sample("d.p", 1.0, 3)]))
    await asyncio.sleep(0.05)
    assert not fourth.done()  # three outstanding: the fourth waits, as a blocked bus made the source wait
    assert entered == [0, 1, 2]
    release.set()
    await asyncio.wait_for(fourth, 1)
    await asyncio.wait_for(ahead.drain(), 1)
    assert entered == [0, 1, 2, 3] and len(ahead) == 0 and peak <= 3


async def test_a_sink_failure_comes_out_of_the_next_hand_or_drain() -> None:
    async def refusing(batch: list[Sample]) -> bool:
        raise RuntimeError(f"refused {batch[0].ts}")

    ahead = PublishAhead(refusing)
    await ahead.hand([Sample("d.p", 1.0, 7)])
    with pytest.raises(RuntimeError, match="refused 7"):
        await ahead.drain()
    await ahead.hand([Sample("d.p", 1.0, 8)])
    await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError, match="refused 8"):
        await ahead.hand([Sample("d.p", 1.0, 9)])  # raised instead of handing 9 on, as a failed publish did
    await ahead.drain()  # the failure was reported once; 9 was never handed
    assert len(ahead) == 0
    with pytest.raises(ValueError, match="at least one"):
        PublishAhead(refusing, limit=0)


class PoisonedSource(HandingSource):
    """Hands batches on like HandingSource; one of them holds an integer beyond 64 bits (a rule could compute one)."""

    async def run(self, publish: BatchSink, stopping: asyncio.Event) -> None:
        await self.go.wait()
        ahead = PublishAhead(publish, limit=self.count)
        for i in range(self.count):
            value: float | int = 2**70 if i == 3 else float(i)
            if i != 3:
                self.handed.append(float(i))
            await ahead.hand([Sample("probe.value", value, time.time_ns())])
        await ahead.drain()
        self.done.set()
        await stopping.wait()


async def test_an_unencodable_batch_in_a_group_costs_only_itself(tmp_path: Path) -> None:
    source = PoisonedSource(8, 1)
    gateway = Gateway(_probe_site(tmp_path), data_dir=tmp_path / "data", sources=[source])
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    await asyncio.wait_for(gateway.started.wait(), 5)
    blocker = sqlite3.connect(tmp_path / "data" / "outbox.db", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # the batches queue and are grouped, the poisoned one among them
    source.go.set()
    await asyncio.sleep(0.3)
    blocker.execute("ROLLBACK")
    blocker.close()
    await asyncio.wait_for(source.done.wait(), 10)
    stop.set()
    await asyncio.wait_for(runner, 5)
    rows = await _rows(tmp_path / "data" / "outbox.db")
    assert [v for row in rows for v in row] == source.handed  # the seven others, in order, once
    assert gateway.unencodable == 1
