"""Fixtures of the status server tests: a real Gateway (demo site, live cache, bus, outbox on disk) that is not
running, with device statuses the test sets directly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config.site import FIRMWARE_CONFIGS, Site, load_site
from gateway.driver_api import BatchSink, DeviceStatus
from gateway.model import Command, Quality, Sample
from gateway.outbox import Outbox
from gateway.supervisor import Gateway


class StatusSource:
    """A source whose device statuses the test sets directly (the driver behaviour is tested elsewhere)."""

    name = "scripted"

    def __init__(self, statuses: list[DeviceStatus]) -> None:
        self.statuses = statuses

    @property
    def devices(self) -> frozenset[str]:
        return frozenset(s.device for s in self.statuses)

    async def run(self, publish: BatchSink, stopping: asyncio.Event) -> None:
        await stopping.wait()

    async def write(self, command: Command) -> None:
        raise NotImplementedError

    def status(self) -> list[DeviceStatus]:
        return self.statuses


def demo_site() -> Site:
    return load_site(FIRMWARE_CONFIGS / "sites" / "demo.yaml")


def online(device: str, polls: int = 10) -> DeviceStatus:
    status = DeviceStatus(device, "simulator")
    for _ in range(polls):
        status.record_ok(0.002)
    return status


@pytest.fixture
def now() -> int:
    """The wall-clock time the fixture's samples were stamped against (taken per test: ages are real time)."""
    return time.time_ns()


@pytest.fixture
async def gateway(tmp_path: Path, now: int) -> AsyncIterator[Gateway]:
    site = demo_site()
    statuses = [online(device.id) for device in site.config.devices]
    gw = Gateway(site, data_dir=tmp_path, http_listen="off", sources=[StatusSource(statuses)])
    gw.sources = [StatusSource(statuses)]
    gw.outbox = Outbox(tmp_path / "outbox.db")
    gw.started_ns = now - 5_000_000_000
    gw.started.set()
    gw.live.watched()  # the page is open: history is kept from here on (gateway/live.py)
    gw.live.update(
        [
            Sample("zone1.co2", 612.5, now - 2_000_000_000, Quality.GOOD),
            Sample("zone1.co2", 640.0, now - 1_000_000_000, Quality.GOOD),
            Sample("zone1.occupancy", 3, now - 1_000_000_000, Quality.GOOD),
            Sample("apt101.power_kw", None, now - 1_000_000_000, Quality.BAD),
        ]
    )
    try:
        yield gw
    finally:
        await gw.outbox.close()
