"""The scheduler's pure parts on a fake clock: poll phase, per-slave breaker, write checks before anything is sent."""

from __future__ import annotations

import pytest

from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig, ModbusProfile
from drivers.modbus.source import ModbusBusSource, PollClock
from gateway.errors import DeviceUnavailable, WriteRejected
from gateway.model import Command


def test_poll_clock_keeps_phase_and_skips_missed_slots() -> None:
    clock = PollClock([1.0, 10.0], start=100.0)
    assert clock.take_due(100.0) == (1.0, 10.0)
    assert clock.take_due(100.5) == ()
    assert clock.take_due(101.3) == (1.0,)  # late by 0.3 s
    assert clock.due[1.0] == 102.0  # next slot stays in phase
    assert clock.take_due(105.7) == (1.0,)  # three slots missed while busy: one poll, not four
    assert clock.due[1.0] == 106.0
    assert clock.next_due() == 106.0
    assert clock.take_due(110.0) == (1.0, 10.0)
    assert clock.due == {1.0: 111.0, 10.0: 120.0}


def test_poll_clock_restart_makes_everything_due_now() -> None:
    clock = PollClock([1.0, 10.0], start=100.0)
    clock.take_due(100.0)
    clock.restart(104.5)
    assert clock.take_due(104.5) == (1.0, 10.0)
    assert clock.due == {1.0: 105.5, 10.0: 114.5}


PROFILE = ModbusProfile.model_validate(
    {
        "driver": "modbus",
        "vendor": "T",
        "model": "T",
        "doc": "test",
        "points": {
            "speed": {
                "table": "holding",
                "address": 0,
                "type": "i16",
                "scale": 0.1,
                "writable": True,
                "min": 0,
                "max": 50,
            },
            "raw": {"table": "holding", "address": 1, "type": "u16", "writable": True},
            "run": {"table": "coil", "address": 0, "writable": True},
            "volts": {"table": "input", "address": 0, "type": "f32"},
        },
    }
)


def make_source() -> ModbusBusSource:
    bus = ModbusBusConfig.model_validate({"id": "b", "type": "tcp", "host": "127.0.0.1"})
    device = ModbusDeviceConfig(id="vfd", driver="modbus", profile="t", bus="b", unit=1)
    return ModbusBusSource(bus, [(device, PROFILE)], clock=lambda: 0.0)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (Command("vfd.volts", 1.0, "rule"), "not writable"),
        (Command("vfd.nothing", 1.0, "rule"), "not a point of modbus"),
        (Command("vfd.speed", 50.5, "rule"), "outside the profile's bounds"),
        (Command("vfd.speed", -1, "rule"), "outside the profile's bounds"),
        (Command("vfd.speed", 12.34, "rule"), "not a multiple of the register's resolution"),
        (Command("vfd.speed", "fast", "rule"), "takes a number"),
        (Command("vfd.raw", 70000, "rule"), "outside what a u16"),
        (Command("vfd.run", 2, "rule"), "is a coil"),
    ],
)
async def test_bad_writes_are_refused_before_anything_is_queued(command: Command, message: str) -> None:
    source = make_source()
    with pytest.raises(WriteRejected, match=message):
        await source.write(command)


async def test_a_good_write_to_a_bus_that_is_not_running_fails_as_unavailable() -> None:
    source = make_source()
    with pytest.raises(DeviceUnavailable, match="not running"):
        await source.write(Command("vfd.speed", 12.5, "rule"))


def test_source_refuses_devices_of_another_bus() -> None:
    bus = ModbusBusConfig.model_validate({"id": "other", "type": "tcp", "host": "h"})
    device = ModbusDeviceConfig(id="vfd", driver="modbus", profile="t", bus="b", unit=1)
    with pytest.raises(ValueError, match="is on bus b"):
        ModbusBusSource(bus, [(device, PROFILE)])


def test_defaults_reconnect_fast_and_back_off_with_the_shared_policy() -> None:
    """The bus defaults give recovery in about a second: a first retry after 250 ms, never more than 2 s (+20 %)
    between attempts; a silent slave is retried after 500 ms, at most every 10 s."""
    bus = ModbusBusConfig.model_validate({"id": "b", "type": "tcp", "host": "h"})
    device = ModbusDeviceConfig(id="vfd", driver="modbus", profile="t", bus="b", unit=1)
    now = [0.0]
    source = ModbusBusSource(bus, [(device, PROFILE)], clock=lambda: now[0], jitter=lambda: 1.0)
    policy = source.link_policy
    waits = []
    for _ in range(8):
        waits.append(policy.failed("refused"))
        now[0] += waits[-1]
    assert waits == pytest.approx([0.3, 0.6, 1.2, 2.4, 2.4, 2.4, 2.4, 2.4])  # jitter at its top: +20 %
    assert policy.succeeded() == pytest.approx(sum(waits))
    assert policy.next_delay_bounds() == pytest.approx((0.2, 0.3))
    assert source.status()[0].info == {"max_registers": 125}
    assert (bus.backoff_min, bus.backoff_max) == (0.5, 10.0)
