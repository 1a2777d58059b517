"""The supervisor: start-up, ordered shutdown that stores everything read, crash isolation, the command router."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.config.site import FIRMWARE_CONFIGS, Site, load_site
from gateway.driver_api import BatchSink, DeviceStatus
from gateway.errors import WriteRejected
from gateway.model import Command, Quality, Sample
from gateway.outbox import Outbox
from gateway.supervisor import Gateway


def _demo() -> Site:
    return load_site(FIRMWARE_CONFIGS / "sites" / "demo.yaml")


async def _stored(path: Path) -> list[Sample]:
    outbox = Outbox(path)
    try:
        return [s for batch in outbox.read_telemetry(0, limit=1_000_000) for s in batch.samples]
    finally:
        await outbox.close()


async def test_every_sample_read_before_stop_is_in_the_store(tmp_path: Path) -> None:
    site = _demo()
    gateway = Gateway(site, data_dir=tmp_path, http_listen="off")
    published: list[Sample] = []
    gateway.bus.tap(published.extend)
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    await asyncio.wait_for(gateway.started.wait(), 5)
    await asyncio.sleep(1.2)
    stop.set()
    await asyncio.wait_for(runner, 2)

    stored = await _stored(tmp_path / "outbox.db")
    assert {(s.point, s.ts) for s in stored} == {(s.point, s.ts) for s in published}
    physical = {point for point, info in site.registry.items() if info.physical}
    assert physical <= {s.point for s in stored}  # every simulated point produced samples
    assert all(s.quality is Quality.GOOD for s in stored)


class ScriptedSource:
    """A source that reports what it saw and publishes one last batch after it is told to stop."""

    name = "scripted"

    def __init__(self, log: list[str], *, crash_first: bool = False) -> None:
        self.log = log
        self.crash_first = crash_first
        self.runs = 0

    @property
    def devices(self) -> frozenset[str]:
        return frozenset({"probe"})

    async def run(self, publish: BatchSink, stopping: asyncio.Event) -> None:
        self.runs += 1
        if self.crash_first and self.runs == 1:
            raise RuntimeError("bug in a driver")
        await publish([Sample("probe.value", 1.0, time.time_ns())])
        await stopping.wait()
        self.log.append("source saw stop")
        await publish([Sample("probe.value", 2.0, time.time_ns())])  # read during shutdown: must be kept
        self.log.append("source published last batch")

    async def write(self, command: Command) -> None:
        self.log.append(f"write {command.point}")

    def status(self) -> list[DeviceStatus]:
        return [DeviceStatus("probe", "scripted")]


def _probe_site(tmp_path: Path) -> Site:
    path = tmp_path / "site.yaml"
    path.write_text("version: 1\ngateway: {id: gw1, site: lab}\nhttp: {enabled: false}\n")
    return load_site(path)


async def test_shutdown_stops_drivers_first_and_stores_their_last_batch(tmp_path: Path) -> None:
    log: list[str] = []
    gateway = Gateway(_probe_site(tmp_path), data_dir=tmp_path / "data", sources=[ScriptedSource(log)])
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    await asyncio.wait_for(gateway.started.wait(), 5)
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(runner, 2)
    assert log == ["source saw stop", "source published last batch"]
    values = [s.value for s in await _stored(tmp_path / "data" / "outbox.db")]
    assert values == [1.0, 2.0]


async def test_a_crashing_source_is_restarted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    source = ScriptedSource(log, crash_first=True)
    gateway = Gateway(_probe_site(tmp_path), data_dir=tmp_path / "data", sources=[source])
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    await asyncio.wait_for(gateway.started.wait(), 5)
    for _ in range(300):  # restarted after its ~1 s backoff
        if source.runs >= 2:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(runner, 3)
    assert source.runs == 2
    assert "scripted crashed" in caplog.text


async def test_writes_are_refused_without_an_allowlist(tmp_path: Path) -> None:
    log: list[str] = []
    gateway = Gateway(_probe_site(tmp_path), data_dir=tmp_path / "data", sources=[ScriptedSource(log)])
    with pytest.raises(WriteRejected, match="no rule file allows writes"):
        await gateway.execute_command(Command("probe.value", 3, "platform"))
    assert log == []  # never reached the driver
    assert gateway.commands.entries[-1]["result"] == "refused"
