"""Priorities and relinquish end to end: a real gateway (site file, rule file, supervisor, BACnet driver) against a
real bacpypes3 device on loopback (tests/integration/bacnet/devices.py). A rule writes at its allowlist entry's
priority and relinquishes that slot when it clears; the platform relinquishes through ``cmd/write``; refusals touch
no device."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from drivers.bacnet.client import BacnetLink
from drivers.bacnet.config import BacnetDeviceConfig, BacnetNetworkConfig, BacnetProfile
from drivers.bacnet.source import BacnetNetworkSource
from gateway.command_journal import JOURNAL_FILE, CommandJournal
from gateway.config.site import load_site
from gateway.errors import DeviceRejected, WriteRejected
from gateway.model import Command
from gateway.outbox import Outbox
from gateway.platform_commands import PlatformCommands
from gateway.supervisor import Gateway
from tests.integration.bacnet.devices import Device, free_udp_port, start_device

pytestmark = pytest.mark.integration

PROFILE = """\
driver: bacnet
vendor: Test
model: VAV-1
doc: tests
points:
  zone_temp: {object: "analog-input,1", unit: degrees-celsius}
  damper: {object: "analog-value,1", unit: percent, writable: true, min: 0, max: 100}
  setpoint: {object: "analog-value,2", unit: percent, writable: true, min: 0, max: 100, priority: 10}
  enable: {object: "binary-value,1", writable: true}
"""

RULES = """\
version: 1
allow:
  bms:
    - {point: vav1.damper, min: 0, max: 100, priority: 12, relinquish: true}
    - {point: vav1.setpoint, min: 0, max: 100, priority: 14, relinquish: true}
    - {point: vav1.enable}
rules:
  - id: zone-hot
    when: vav1.zone_temp > 25
    clear_when: vav1.zone_temp < 22
    then:
      - write: {point: vav1.damper, value: 70}
    on_clear:
      - write: {point: vav1.damper, relinquish: true}
"""

DAMPER_DEFAULT = 40.0
SETPOINT_DEFAULT = 50.0


def slot(device: Device, ident: str, priority: int) -> Any:
    """The value held in one slot (1-based) of an object's priority array; None when the slot is empty."""
    entry = device.objects[ident].priorityArray[priority - 1]
    return None if entry.null is not None else (entry.real if entry.real is not None else entry)


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Until the gateway has done it (a bounded wait for an event, not a timing check)."""
    for _ in range(1200):
        if condition():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"never happened: {what}")


@dataclass
class Running:
    gateway: Gateway
    device: Device
    tmp_path: Path


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    device = await start_device(
        4001,
        {
            "analog-input,1": 21.0,
            "analog-value,1": DAMPER_DEFAULT,
            "analog-value,2": SETPOINT_DEFAULT,
            "binary-value,1": "inactive",
        },
    )
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "test-vav.yaml").write_text(PROFILE)
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "vav-rules.yaml").write_text(RULES)
    site_path = tmp_path / "sites" / "site.yaml"
    site_path.write_text(
        "version: 1\ngateway: {id: gw1, site: lab}\nhttp: {enabled: false}\nrules: [vav-rules.yaml]\n"
        # generous timeouts and a short backoff: on a loaded machine a slow answer must not open the device's breaker
        # for long, or the rule's clear (and so its relinquish) would wait for the next try
        f"bacnet_networks:\n  - {{id: bms, address: 127.0.0.1, port: {free_udp_port()}, timeout: 2s, retries: 3,"
        " backoff_min: 50ms, backoff_max: 200ms}\n"
        "devices:\n"
        f"  - {{id: vav1, driver: bacnet, profile: test-vav, network: bms, instance: 4001, address: "
        f'"{device.address}", poll: 100ms}}\n'
    )
    gateway = Gateway(load_site(site_path), data_dir=tmp_path / "data")
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    try:
        await asyncio.wait_for(gateway.started.wait(), 10)
        yield Running(gateway, device, tmp_path)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
        device.close()


async def test_a_rule_writes_at_its_entry_priority_and_relinquishes_the_slot_when_it_clears(running: Running) -> None:
    device = running.device
    damper = device.objects["analog-value,1"]
    device.objects["analog-input,1"].presentValue = 30.0  # the zone gets hot: the rule fires at the next poll

    entries = running.gateway.commands.entries
    await wait_for(lambda: len(entries) == 1, "the rule's write")  # recorded once the device acknowledged it
    assert slot(device, "analog-value,1", 12) == 70.0
    assert damper.presentValue == 70.0
    assert slot(device, "analog-value,1", 8) is None  # the entry's priority 12, not the profile's 8

    device.objects["analog-input,1"].presentValue = 20.0  # cooled down: the rule clears and relinquishes
    await wait_for(lambda: len(entries) == 2, "the rule's relinquish")
    assert slot(device, "analog-value,1", 12) is None
    assert damper.presentValue == DAMPER_DEFAULT  # the device's own logic (relinquish-default) has it back
    results = [(e["point"], e["value"], e["origin"], e["result"]) for e in entries]
    assert results == [("vav1.damper", 70, "zone-hot", "ok"), ("vav1.damper", None, "zone-hot", "ok")]


def command(**fields: object) -> bytes:
    return orjson.dumps({"v": 1, "ts": time.time_ns() // 10**6, **fields})


async def test_the_platform_writes_and_relinquishes_through_the_allowlist(running: Running) -> None:
    device = running.device
    outbox = Outbox(running.tmp_path / "platform-outbox.db")
    journal = CommandJournal(running.tmp_path / JOURNAL_FILE)
    platform = PlatformCommands(running.gateway.execute_command, outbox, journal, gateway_id="gw1")
    try:
        await platform.handle("write", command(id="c1", point="vav1.setpoint", value=65))
        assert slot(device, "analog-value,2", 14) == 65.0 and slot(device, "analog-value,2", 10) is None
        await platform.handle("write", command(id="c2", point="vav1.setpoint", relinquish=True))
        assert slot(device, "analog-value,2", 14) is None
        assert device.objects["analog-value,2"].presentValue == SETPOINT_DEFAULT

        writes = device.requests.get("WritePropertyRequest", 0)
        await platform.handle("write", command(id="c3", point="vav1.enable", relinquish=True))
        await platform.handle("write", command(id="c4", point="vav1.setpoint", relinquish=True, value=3))
        await platform.handle("write", command(id="c5", point="vav1.setpoint", relinquish=False, value=3))
        assert device.requests.get("WritePropertyRequest", 0) == writes  # refused: nothing reached the device

        bodies = {s.event.subject: s.event.body for s in outbox.read_events(0, limit=100)}
    finally:
        platform.close()
        await outbox.close()
    assert bodies["c1"]["status"] == "applied" and "relinquish" not in bodies["c1"]
    assert bodies["c2"]["status"] == "applied" and bodies["c2"]["relinquish"] is True and bodies["c2"]["value"] is None
    assert bodies["c3"]["status"] == "refused" and "does not permit it" in str(bodies["c3"]["message"])
    assert bodies["c4"]["status"] == "invalid" and "not both" in str(bodies["c4"]["message"])
    assert bodies["c5"]["status"] == "invalid" and "must be true" in str(bodies["c5"]["message"])


async def test_a_relinquish_the_device_refuses_is_a_clear_result_sent_once(tmp_path: Path) -> None:
    """The driver on its own: a relinquish of an object the device does not have is refused by the device, reported
    with its reason, and not retried; a priority no gateway may use is refused before anything is sent."""
    device = await start_device(4002, {"analog-value,1": 10.0})
    try:
        network = BacnetNetworkConfig.model_validate(
            {"id": "bms", "address": "127.0.0.1", "port": free_udp_port(), "timeout": "300ms", "retries": 0}
        )
        profile = BacnetProfile.model_validate(
            {
                "driver": "bacnet",
                "vendor": "t",
                "model": "t",
                "doc": "tests",
                "points": {
                    "sp": {"object": "analog-value,1", "writable": True},
                    "ghost": {"object": "analog-value,9", "writable": True},
                },
            }
        )
        config = BacnetDeviceConfig.model_validate(
            {"id": "vav", "driver": "bacnet", "profile": "p", "network": "bms", "instance": 4002}
            | {"address": device.address}
        )
        source = BacnetNetworkSource(network, [(config, profile)])
        async with BacnetLink(network) as link:
            source._link = link
            await source.write(Command("vav.sp", 20.0, "test", priority=13))
            assert slot(device, "analog-value,1", 13) == 20.0
            await source.relinquish("vav.sp", priority=13)
            assert slot(device, "analog-value,1", 13) is None

            with pytest.raises(DeviceRejected, match="refused the relinquish at priority 11"):
                await source.write(Command("vav.ghost", None, "test", priority=11, relinquish=True))
            sent = device.requests["WritePropertyRequest"]
            for reserved in (1, 2, 6, 0, 17):
                with pytest.raises(WriteRejected, match=f"priority {reserved} is not one"):
                    await source.write(Command("vav.sp", 20.0, "test", priority=reserved))
            with pytest.raises(WriteRejected, match="takes a number"):
                await source.write(Command("vav.sp", "relinquish", "test"))  # the old magic string is just text
            assert device.requests["WritePropertyRequest"] == sent  # only the ghost's one request, no retry
            assert sent == 3
    finally:
        device.close()
