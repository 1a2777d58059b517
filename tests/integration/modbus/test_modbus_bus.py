"""The bus scheduler against a real pymodbus server: over TCP, and over RTU on a socat pty pair.

Shown here: several slaves on one bus; a dead slave does not stall the others; a slave answering exception codes;
the server killed and restarted mid-run; a write in bounds reaches the register, one out of bounds is never sent.
Timeouts are 0.2 s so the whole file runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig, ModbusProfile
from drivers.modbus.source import ModbusBusSource
from gateway.driver_api import DeviceState
from gateway.errors import DeviceUnavailable, WriteRejected
from gateway.model import Command, Quality, Sample

pytestmark = pytest.mark.integration

PROFILE = ModbusProfile.model_validate(
    {
        "driver": "modbus",
        "vendor": "Test",
        "model": "Server",
        "doc": "tests/integration/modbus/modbus_server.py register layout",
        "points": {
            "first": {"table": "holding", "address": 0, "type": "u16"},
            "pair_cdab": {"table": "holding", "address": 2, "type": "u32", "order": "CDAB"},
            "scaled": {"table": "holding", "address": 5, "type": "i16", "scale": 0.1},
            "bit1": {"table": "holding", "address": 7, "type": "bool", "bit": 0},
            "setpoint": {
                "table": "holding",
                "address": 40,
                "type": "i16",
                "scale": 0.1,
                "writable": True,
                "min": 0,
                "max": 50,
                "readback": True,
            },
            "inp": {"table": "input", "address": 3, "type": "u16"},
            "coil0": {"table": "coil", "address": 0},
            "coil1": {"table": "coil", "address": 1},
        },
    }
)


def expected_values(unit: int) -> dict[str, object]:
    h = lambda i: unit * 1000 + i  # noqa: E731
    return {
        "first": h(0),
        "pair_cdab": (h(3) << 16) | h(2),
        "scaled": pytest.approx(h(5) * 0.1),
        "bit1": bool(h(7) & 1),
        "setpoint": pytest.approx(h(40) * 0.1),
        "inp": unit * 100 + 3,
        "coil0": True,
        "coil1": False,
    }


def make_source(bus: dict[str, Any], units: list[int], poll: str = "250ms") -> ModbusBusSource:
    config = ModbusBusConfig.model_validate(
        {
            "id": "test",
            "timeout": "200ms",
            "retries": 0,
            "reconnect_min": "100ms",
            "reconnect_max": "400ms",
            "backoff_min": "1s",
            "backoff_max": "2s",
            **bus,
        }
    )
    devices = [
        (ModbusDeviceConfig(id=f"dev{u}", driver="modbus", profile="test", bus="test", unit=u, poll=poll), PROFILE)
        for u in units
    ]
    return ModbusBusSource(config, devices)


class Runner:
    """Runs a source in the background and records every batch it publishes."""

    def __init__(self, source: ModbusBusSource) -> None:
        self.source = source
        self.batches: list[list[Sample]] = []
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def publish(self, batch: list[Sample]) -> None:
        self.batches.append(batch)

    async def __aenter__(self) -> Runner:
        self.task = asyncio.create_task(self.source.run(self.publish, self.stopping), name="test.modbus")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stopping.set()
        assert self.task is not None
        started = time.monotonic()
        await asyncio.wait_for(self.task, timeout=3)
        assert time.monotonic() - started < 1.0, "run() must return promptly once stopping is set"

    def of(self, device: str) -> list[list[Sample]]:
        return [b for b in self.batches if b and b[0].point.startswith(device + ".")]

    def last(self, device: str) -> dict[str, Sample]:
        batches = self.of(device)
        return {s.point.partition(".")[2]: s for s in batches[-1]} if batches else {}

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s; {len(self.batches)} batches")
            await asyncio.sleep(0.02)


def assert_good_values(samples: dict[str, Sample], unit: int) -> None:
    assert {name: s.value for name, s in samples.items()} == expected_values(unit)
    assert all(s.quality is Quality.GOOD for s in samples.values())


async def test_tcp_several_slaves_one_dead_one_refusing(tcp_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = tcp_server("--units", "1,2,3", "--dead", "9", "--refuse", "7:2")
    source = make_source({"type": "tcp", "host": "127.0.0.1", "port": server.port}, [1, 2, 9, 3, 7])
    caplog.set_level(logging.INFO, logger="drivers.modbus")
    before = time.time_ns()
    async with Runner(source) as run:
        await run.wait_until(lambda: all(len(run.of(f"dev{u}")) >= 9 for u in (1, 2, 3)))
        window = (time.time_ns() - before) / 1e9
    for unit in (1, 2, 3):
        assert_good_values(run.last(f"dev{unit}"), unit)
        assert all(before <= s.ts <= time.time_ns() for s in run.last(f"dev{unit}").values())
    # 9 polls at 250 ms take 2.0 s plus the first poll; the dead slave (0.2 s timeout, then disabled) must not
    # push the others off their schedule
    assert window < 2.0 + 0.6, f"live slaves were stalled: 9 polls took {window:.2f}s"
    dead = run.of("dev9")
    assert dead, "the dead slave's failure is published"
    assert all(s.quality is Quality.BAD and s.value is None for batch in dead for s in batch)
    # each BAD sample says why: silent until its breaker opened, then disabled (not asked)
    assert {s.reason for batch in dead for s in batch} == {"no_answer", "disabled"}
    assert len(dead) >= 5, "a disabled slave still gets one BAD batch per poll cycle (the outage is explicit)"
    assert all(len({s.point for s in batch}) == len(batch) == len(PROFILE.points) for batch in dead)
    failures = source.status()[2].failures
    assert failures.get("no_answer", 0) <= 3, f"a dead slave is disabled, not asked every cycle: {failures}"
    assert failures.get("disabled", 0) >= 2, failures
    refused = run.last("dev7")
    assert all(s.quality is Quality.BAD and s.value is None for s in refused.values())
    assert {s.reason for s in refused.values()} == {"exception_2"}
    status = {s.device: s for s in source.status()}
    assert status["dev9"].state is DeviceState.DISABLED
    assert status["dev7"].state is DeviceState.OFFLINE
    assert "exception 2 (illegal data address)" in (status["dev7"].last_error or "")
    assert status["dev1"].state is DeviceState.ONLINE
    messages = [r.getMessage() for r in caplog.records]
    assert sum("dev9 (unit 9): not answering" in m for m in messages) == 1, "one log line per outage"
    assert sum("dev7 (unit 7): refused every read" in m for m in messages) == 1
    assert status["dev7"].failures.get("exception_2", 0) >= 9, status["dev7"].failures


async def test_tcp_server_restart_reconnects_and_logs_once(tcp_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = tcp_server("--units", "1")
    source = make_source({"type": "tcp", "host": "127.0.0.1", "port": server.port}, [1], poll="100ms")
    caplog.set_level(logging.INFO, logger="drivers.modbus")
    async with Runner(source) as run:
        await run.wait_until(lambda: len(run.of("dev1")) >= 3)
        server.kill()
        await run.wait_until(lambda: any(s.quality is Quality.BAD for s in run.of("dev1")[-1]))
        await asyncio.sleep(0.6)  # several reconnect attempts fail while the device is off
        with pytest.raises(DeviceUnavailable, match="not connected; write not sent"):
            await source.write(Command("dev1.setpoint", 1.0, "test"))  # refused at once, not after a timeout
        server.start()
        await run.wait_until(lambda: run.last("dev1")["first"].quality is Quality.GOOD, timeout=5)
    assert_good_values(run.last("dev1"), 1)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("connection lost" in m for m in messages) == 1, messages
    assert sum("modbus[test]: back after" in m for m in messages) == 1, messages
    # the first answered poll reset the backoff: the next outage starts again from the fast first retry
    policy = source.link_policy
    assert not policy.down and policy.attempts == 0
    assert policy.next_delay_bounds() == pytest.approx((0.1 * 0.8, 0.1 * 1.2))
    status = source.status()[0]
    assert status.state is DeviceState.ONLINE
    # while the server was away, every poll cycle published one BAD sample per point, not just the first one
    assert status.failures.get("link_down", 0) >= 3, status.failures
    bad = [batch for batch in run.of("dev1") if all(s.quality is Quality.BAD for s in batch)]
    assert len(bad) >= 4
    assert all(sorted(s.point for s in batch) == sorted(f"dev1.{n}" for n in PROFILE.points) for batch in bad)


async def test_tcp_write_in_bounds_reaches_the_register_and_out_of_bounds_is_never_sent(tcp_server: Any) -> None:
    server = tcp_server("--units", "1")
    source = make_source({"type": "tcp", "host": "127.0.0.1", "port": server.port}, [1], poll="100ms")
    async with Runner(source) as run:
        await run.wait_until(lambda: len(run.of("dev1")) >= 1)
        await source.write(Command("dev1.setpoint", 42.5, "test"))  # read back inside the write
        await run.wait_until(lambda: run.last("dev1")["setpoint"].value == pytest.approx(42.5))
        with pytest.raises(WriteRejected, match="outside the profile's bounds"):
            await source.write(Command("dev1.setpoint", 50.1, "test"))
        with pytest.raises(WriteRejected, match="not writable"):
            await source.write(Command("dev1.first", 1, "test"))
        with pytest.raises(WriteRejected, match="not a point of modbus"):
            await source.write(Command("other.setpoint", 1, "test"))
        polls = len(run.of("dev1"))
        await run.wait_until(lambda: len(run.of("dev1")) >= polls + 2)
    assert run.last("dev1")["setpoint"].value == pytest.approx(42.5), "the refused write never reached the device"


async def test_rtu_on_a_pty_pair_several_slaves_one_dead(pty_pair: tuple[str, str], modbus_servers: list[Any]) -> None:
    from tests.integration.modbus.conftest import ServerProcess

    gateway_end, device_end = pty_pair
    server = ServerProcess("--serial", device_end, "--baud", "115200", "--units", "1,2", "--dead", "3")
    modbus_servers.append(server)
    server.start()
    source = make_source({"type": "rtu", "serial": gateway_end, "baudrate": 115200}, [1, 3, 2])
    async with Runner(source) as run:
        await run.wait_until(lambda: all(len(run.of(f"dev{u}")) >= 4 for u in (1, 2)))
        await source.write(Command("dev2.setpoint", 12.3, "test"))
        await run.wait_until(lambda: run.last("dev2")["setpoint"].value == pytest.approx(12.3))
    assert_good_values(run.last("dev1"), 1)
    assert run.last("dev2")["first"].value == 2000
    assert all(s.quality is Quality.BAD for s in run.last("dev3").values())
    assert {s.device: s.state for s in source.status()}["dev3"] is DeviceState.DISABLED


FLOATS = ModbusProfile.model_validate(
    {
        "driver": "modbus",
        "vendor": "Test",
        "model": "Floats",
        "doc": "tests/integration/modbus/modbus_server.py --words",
        "points": {
            "nan": {"table": "holding", "address": 100, "type": "f32"},
            "plus_inf": {"table": "holding", "address": 102, "type": "f32"},
            "fine": {"table": "holding", "address": 104, "type": "f32"},
            "minus_inf": {"table": "holding", "address": 106, "type": "f32"},
            "huge_a": {"table": "holding", "address": 110, "type": "f64"},
            "huge_b": {"table": "holding", "address": 114, "type": "f64"},
        },
    }
)


def _words(address: int, raw: bytes) -> list[str]:
    return [f"{address + k // 2}:{raw[k : k + 2].hex().upper()}" for k in range(0, len(raw), 2)]


#: NaN, +inf, 21.5, -inf as f32, then two finite doubles whose sum overflows (1.5e308 each), big-endian words
WORDS = ",".join(
    [
        *_words(100, struct.pack(">f", math.nan)),
        *_words(102, struct.pack(">f", math.inf)),
        *_words(104, struct.pack(">f", 21.5)),
        *_words(106, struct.pack(">f", -math.inf)),
        *_words(110, struct.pack(">d", 1.5e308)),
        *_words(114, struct.pack(">d", 1.5e308)),
    ]
)


async def test_nan_and_infinity_are_bad_per_point_and_large_finite_doubles_stay_good(tcp_server: Any) -> None:
    # one read holds them all: the read's quick all-finite check must not pass a NaN, and an overflow of its sum
    # (two finite doubles) must not turn good values BAD
    server = tcp_server("--units", "1", "--holding", "200", "--words", WORDS)
    config = ModbusBusConfig.model_validate({"id": "test", "type": "tcp", "host": "127.0.0.1", "port": server.port})
    device = ModbusDeviceConfig(id="dev1", driver="modbus", profile="floats", bus="test", unit=1, poll="250ms")
    source = ModbusBusSource(config, [(device, FLOATS)])
    async with Runner(source) as run:
        await run.wait_until(lambda: bool(run.of("dev1")))
    got = run.last("dev1")
    assert {name: (s.quality, s.reason) for name, s in got.items() if s.quality is Quality.BAD} == {
        "nan": (Quality.BAD, "not_finite"),
        "plus_inf": (Quality.BAD, "not_finite"),
        "minus_inf": (Quality.BAD, "not_finite"),
    }
    assert {name: s.value for name, s in got.items() if s.quality is Quality.GOOD} == {
        "fine": 21.5,
        "huge_a": 1.5e308,
        "huge_b": 1.5e308,
    }
