"""What the runtime expects of a driver, and the per-device status it reports.

A *source* is what the supervisor runs: one per physical bus (Modbus), broker connection (MQTT) or simulator. It
owns its connection(s) and reconnect loop, reads its devices, and hands batches to ``publish``. The supervisor never
sees a protocol library.

Each driver registers a plugin (``gateway.plugins.DriverPlugin``, docs/architecture.md) whose ``build_sources(site)``
returns its sources; the supervisor calls it only when the site uses that driver, and the plugin imports its protocol
library only then, so an MQTT-only gateway never loads pymodbus.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from gateway.model import Command, Sample

#: where a source delivers its batches. The gateway's sink returns once the outbox has committed the batch (True),
#: or has given it up while stopping with the disk refusing it (False, counted as lost): a source that acknowledges
#: its own upstream (MQTT QoS 1/2) acknowledges only after True, so a crash can never lose an acknowledged message.
#: Awaiting it is also the back-pressure. A sink that returns None (a test's) means "handed on".
BatchSink = Callable[[list[Sample]], Awaitable[bool | None]]


class DeviceState(StrEnum):
    UNKNOWN = "unknown"  # not yet polled
    ONLINE = "online"
    DEGRADED = "degraded"  # answering, but some of its reads fail: those points are BAD, the others GOOD
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
    #: failed reads (or skipped poll cycles) by reason, e.g. ``{"exception_3": 2, "no_answer": 5}``
    failures: dict[str, int] = field(default_factory=dict)
    #: driver facts worth showing an operator, e.g. ``{"max_registers": 60}`` learned from a Modbus device
    info: dict[str, int | float | str | None] = field(default_factory=dict)

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

    def count_failure(self, reason: str, count: int = 1) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + count

    def record_partial(self, latency_s: float, message: str) -> bool:
        """Count a poll that was answered in part (some reads failed); True when this starts the degraded state.
        It counts as answered: the device is not offline, and its good reads' latency is kept."""
        previous = self.state
        self.record_ok(latency_s)
        self.last_error = message
        self.state = DeviceState.DEGRADED
        if previous is DeviceState.DEGRADED:
            return False
        self.since_ns = self.last_ok_ns
        return True

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
