"""Devices that are not exactly as configured, against a real pymodbus server (issue 15, item 1).

Shown here: a meter that refuses reads of more than N registers with exception 3 is read in pieces within the same
poll (no point ever goes BAD), its limit is learned once and reported; a device whose only failing read is refused
is ``degraded`` (its other points GOOD), not ``offline``; ``max_registers`` on the device entry is honoured from
the first read. Timeouts are 0.2 s so the file runs in a few seconds.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig, ModbusProfile
from drivers.modbus.planner import explain_bus
from drivers.modbus.source import ModbusBusSource
from gateway.driver_api import DeviceState
from gateway.model import Quality
from tests.integration.modbus.test_modbus_bus import Runner

pytestmark = pytest.mark.integration

#: 100 u16 registers in a row: one coalesced read of 100 registers when nothing limits it
WIDE = ModbusProfile.model_validate(
    {
        "driver": "modbus",
        "vendor": "Test",
        "model": "Wide",
        "doc": "tests/integration/modbus/modbus_server.py register layout",
        "points": {f"r{i}": {"table": "holding", "address": i, "type": "u16"} for i in range(100)},
    }
)


def source_for(port: int, unit: int, profile: ModbusProfile, **device: Any) -> ModbusBusSource:
    bus = ModbusBusConfig.model_validate(
        {"id": "test", "type": "tcp", "host": "127.0.0.1", "port": port, "timeout": "200ms", "retries": 0}
    )
    config = ModbusDeviceConfig.model_validate(
        {"id": "meter", "driver": "modbus", "profile": "test", "bus": "test", "unit": unit, "poll": "100ms", **device}
    )
    return ModbusBusSource(bus, [(config, profile)])


async def test_a_meter_refusing_long_reads_is_split_and_its_limit_learned(
    tcp_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = tcp_server("--limit", "5:60")
    source = source_for(server.port, 5, WIDE)
    caplog.set_level(logging.WARNING, logger="drivers.modbus")
    async with Runner(source) as run:
        await run.wait_until(lambda: source.status()[0].info.get("max_registers_learned") == "exact")
        polls = len(run.of("meter"))
        await run.wait_until(lambda: len(run.of("meter")) >= polls + 3)  # and it stays learned
    first = run.of("meter")[0]
    # the refused 100-register read was re-read in halves inside the same poll: nothing went BAD, even once
    assert {s.point.partition(".")[2]: s.value for s in first} == {f"r{i}": 5000 + i for i in range(100)}
    assert all(s.quality is Quality.GOOD for batch in run.of("meter") for s in batch)
    status = source.status()[0]
    assert status.state is DeviceState.ONLINE
    assert status.info["max_registers"] == 60, "the exact limit, not the half that first answered"
    # refused: 100, then the sizes tried between the bounds (75, 62, 61); none once the limit is exact
    assert status.failures == {"exception_3": 4}
    assert source.learned_limits() == {"meter": 60} and not source.learning_limits()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("learning its limit" in m for m in messages) == 1, messages
    assert sum("answers at most 60 registers per read" in m for m in messages) == 1, messages


async def test_the_split_goes_down_to_the_size_the_device_takes(tcp_server: Any) -> None:
    server = tcp_server("--limit", "5:20")
    source = source_for(server.port, 5, WIDE)
    async with Runner(source) as run:
        await run.wait_until(lambda: source.status()[0].info.get("max_registers_learned") == "exact")
    assert all(s.quality is Quality.GOOD for batch in run.of("meter") for s in batch)
    # first poll: 100 -> 50 -> 25 refused, 12 and 13 answered; later polls narrow 13..24 down to 20
    assert source.status()[0].info["max_registers"] == 20
    assert source.learned_limits() == {"meter": 20}


async def test_max_registers_on_the_device_entry_is_used_from_the_first_read(tcp_server: Any) -> None:
    server = tcp_server("--limit", "5:60")
    source = source_for(server.port, 5, WIDE, max_registers=60)
    async with Runner(source) as run:
        await run.wait_until(lambda: len(run.of("meter")) >= 3)
    status = source.status()[0]
    assert status.failures == {}, "nothing refused: the configured limit fits the device"
    assert status.info == {"max_registers": 60}
    assert all(s.quality is Quality.GOOD for batch in run.of("meter") for s in batch)


async def test_one_refused_read_makes_the_device_degraded_not_offline(
    tcp_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # the server maps 200 holding registers: a point at 500 is refused (exception 2) on its own read
    profile = ModbusProfile.model_validate(
        {
            "driver": "modbus",
            "vendor": "Test",
            "model": "Partial",
            "doc": "tests/integration/modbus/modbus_server.py register layout",
            "points": {
                "first": {"table": "holding", "address": 0, "type": "u16"},
                "second": {"table": "holding", "address": 1, "type": "u16"},
                "missing": {"table": "holding", "address": 500, "type": "u16"},
            },
        }
    )
    server = tcp_server("--units", "1")
    source = source_for(server.port, 1, profile)
    caplog.set_level(logging.WARNING, logger="drivers.modbus")
    async with Runner(source) as run:
        await run.wait_until(lambda: len(run.of("meter")) >= 4)
    last = run.last("meter")
    assert last["first"].value == 1000 and last["first"].quality is Quality.GOOD
    assert last["second"].value == 1001
    assert last["missing"].quality is Quality.BAD and last["missing"].value is None
    status = source.status()[0]
    assert status.state is DeviceState.DEGRADED
    assert status.last_ok_ns > 0, "it did read OK: never shown as 'never read OK'"
    assert "exception 2" in (status.last_error or "")
    assert status.failures["exception_2"] >= 4
    assert sum("degraded" in r.getMessage() for r in caplog.records) == 1, "one log line, not one per poll"


def test_plan_reports_device_and_bus_limits() -> None:
    bus = ModbusBusConfig.model_validate({"id": "b", "type": "tcp", "host": "h", "max_registers": 80})
    config = ModbusDeviceConfig.model_validate(
        {"id": "meter", "driver": "modbus", "profile": "test", "bus": "b", "unit": 1, "max_registers": 60}
    )
    text = explain_bus(bus, [(config, WIDE)])
    assert "max 60 registers per read (device)" in text
    assert "2 requests touching 100 registers" in text
    learned = explain_bus(bus, [(config, WIDE)], learned={"meter": 40})
    assert "max 40 registers per read (learned: the device refused more; configured 60)" in learned
    assert "3 requests touching 100 registers" in learned


async def test_a_hanging_connect_still_gives_one_bad_batch_per_poll_slot() -> None:
    """A cut cable: connect attempts hang until their timeout. The outage is still explicit slot by slot."""
    import socket

    # a real listener whose accept queue is full: the kernel drops further SYNs, so a connect hangs
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        source = source_for(port, 1, WIDE)  # timeout 200 ms: each connect attempt waits 1.2 s
        async with Runner(source) as run:
            await run.wait_until(lambda: len(run.of("meter")) >= 12, timeout=10)
        batches = run.of("meter")
        assert all(len(b) == 100 and all(s.quality is Quality.BAD and s.value is None for s in b) for b in batches)
        assert {s.reason for b in batches for s in b} == {"link_down"}
        status = source.status()[0]
        assert status.failures["link_down"] == len(batches)
        # far fewer connect attempts than BAD batches: the slots kept coming while the attempts hung
        assert source.link_policy.attempts <= len(batches) / 3, (source.link_policy.attempts, len(batches))
        assert status.state is DeviceState.OFFLINE
        assert status.last_error is not None and "no connection within 1.2s" in status.last_error
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_a_read_through_an_unmapped_hole_is_split_and_holes_are_no_longer_filled(
    tcp_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    profile = ModbusProfile.model_validate(
        {
            "driver": "modbus",
            "vendor": "Test",
            "model": "Drive",
            "doc": "tests/integration/modbus/modbus_server.py register layout",
            "points": {
                "a": {"table": "holding", "address": 0, "type": "u16"},
                "b": {"table": "holding", "address": 2, "type": "u16"},
                "c": {"table": "holding", "address": 6, "type": "u32"},
            },
        }
    )
    server = tcp_server("--hole", "4:3-5")  # registers 3..5 unmapped: the planned read 0..7 touches them
    source = source_for(server.port, 4, profile)
    caplog.set_level(logging.WARNING, logger="drivers.modbus")
    async with Runner(source) as run:
        await run.wait_until(lambda: len(run.of("meter")) >= 4)
    assert all(s.quality is Quality.GOOD for batch in run.of("meter") for s in batch)
    assert run.last("meter")["c"].value == (4006 << 16) | 4007
    status = source.status()[0]
    assert status.state is DeviceState.ONLINE
    assert status.failures == {"exception_2": 1}, "learned once: later polls read around the hole"
    assert status.info["max_fill_learned"] == 0
    assert sum("no longer reading through holes" in r.getMessage() for r in caplog.records) == 1
