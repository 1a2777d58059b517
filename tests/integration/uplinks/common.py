"""Shared set-up for uplink integration tests: a tmp site file with simulated meters and real uplinks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from gateway.config.site import Site, load_site
from gateway.model import Command, Quality, Sample
from gateway.outbox import Outbox
from gateway.uplinks.runner import UplinkRunner, build_uplinks

FAST_DELIVERY = "{batch_size: 500, live_window: 0.5s, retry_min: 0.05s, retry_max: 0.3s, timeout: 3s}"


def write_site(tmp_path: Path, uplinks: str, *, poll: str = "1s") -> Path:
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\n"
        "gateway: {id: gw1, site: tower}\n"
        "http: {enabled: false}\n"
        "devices:\n"
        f"  - {{id: m1, driver: simulator, profile: sim-energy-meter, seed: 1, poll: {poll}}}\n"
        f"  - {{id: m2, driver: simulator, profile: sim-energy-meter, seed: 2, poll: {poll}, tags: {{floor: '2'}}}}\n"
        f"uplinks:\n{uplinks}"
    )
    return site


def load(tmp_path: Path, uplinks: str) -> Site:
    return load_site(write_site(tmp_path, uplinks))


def readings(start: int, count: int, *, t0_ms: int | None = None, device: str = "m1") -> list[Sample]:
    """Two points per read, millisecond timestamps (the TSDB keeps milliseconds)."""
    base = (t0_ms if t0_ms is not None else int(time.time() * 1000) - 600_000) * 1_000_000
    out: list[Sample] = []
    for i in range(start, start + count):
        ts = base + i * 1_000_000
        out.append(Sample(f"{device}.power_kw", round(1.5 + i * 0.25, 3), ts, Quality.GOOD))
        out.append(Sample(f"{device}.energy_kwh", 1000.0 + i, ts, Quality.GOOD))
    return out


class CommandRecorder:
    def __init__(self) -> None:
        self.commands: list[Command] = []

    async def __call__(self, command: Command) -> None:
        from gateway.errors import WriteRejected

        if command.point != "m1.power_kw":
            raise WriteRejected(f"{command.point}: not in any allow list")
        self.commands.append(command)


def runners(site: Site, outbox: Outbox) -> list[UplinkRunner]:
    return build_uplinks(site, outbox, commands=CommandRecorder())


async def wait_for(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
