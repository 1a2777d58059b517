"""What the runtime expects of a driver, and the per-device status it reports.

A *source* is what the supervisor runs: one per physical bus (Modbus), broker connection (MQTT) or simulator. It
owns its connection(s) and reconnect loop, reads its devices, and hands batches to ``publish``. The supervisor never
sees a protocol library.

Each driver package exposes ``build_sources(site) -> list[Source]`` in its ``source`` module; the supervisor imports
it lazily, only when the site uses that driver, so an MQTT-only gateway never loads pymodbus.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from gateway.model import Command, Sample

#: where a source delivers its batches; awaiting it is the back-pressure
BatchSink = Callable[[list[Sample]], Awaitable[None]]


class DeviceState(StrEnum):
    UNKNOWN = "unknown"  # not yet polled
    ONLINE = "online"
    OFFLINE = "offline"  # failing; its points are BAD
    DISABLED = "disabled"  # backed off by the breaker, waiting to retry


@dataclass(slots=True)
class DeviceStatus:
    """Live, mutable status of one device: read by the status page, /metrics and ``edge-gateway status``."""

    device: str
    driver: str
    state: DeviceState = DeviceState.UNKNOWN
    polls: int = 0
    errors: int = 0
    last_ok_ns: int = 0
    last_error: str | None = None
    last_latency_s: float = 0.0
    latency_sum_s: float = 0.0
    since_ns: int = field(default_factory=time.time_ns)

    def record_ok(self, latency_s: float) -> bool:
        """Count a good poll; True when this ends an outage (the caller logs the recovery once)."""
        self.polls += 1
        self.last_ok_ns = time.time_ns()
        self.last_latency_s = latency_s
        self.latency_sum_s += latency_s
        recovered = self.state is DeviceState.OFFLINE or self.state is DeviceState.DISABLED
        if self.state is not DeviceState.ONLINE:
            self.state = DeviceState.ONLINE
            self.since_ns = self.last_ok_ns
        self.last_error = None
        return recovered

    def record_error(self, message: str) -> bool:
        """Count a failed poll; True when this starts an outage (the caller logs it once)."""
        self.polls += 1
        self.errors += 1
        self.last_error = message
        started = self.state is not DeviceState.OFFLINE and self.state is not DeviceState.DISABLED
        if started:
            self.state = DeviceState.OFFLINE
            self.since_ns = time.time_ns()
        return started


@runtime_checkable
class Source(Protocol):
    """One independently running reader of devices."""

    #: task name, e.g. ``modbus[rs485_1]``
    name: str

    @property
    def devices(self) -> frozenset[str]:
        """Device ids this source reads and writes."""
        ...

    async def run(self, publish: BatchSink, stopping: asyncio.Event) -> None:
        """Read until ``stopping`` is set, then return after publishing everything already read."""
        ...

    async def write(self, command: Command) -> None:
        """Write one value; raises WriteRejected (never sent) or DeviceError (sent, failed)."""
        ...

    def status(self) -> list[DeviceStatus]:
        """Current status of each device."""
        ...
