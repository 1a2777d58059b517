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
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

from gateway.errors import ConfigError
from gateway.model import Command, Sample
from gateway.reconnect import ReconnectPolicy, RetryTiming

if TYPE_CHECKING:
    from gateway.config.site_types import DeviceEntry, Site
    from gateway.config.types import StrictModel

#: where a source delivers its batches. The gateway's sink returns once the outbox has committed the batch (True),
#: or has given it up while stopping with the disk refusing it (False, counted as lost): a source that acknowledges
#: its own upstream (MQTT QoS 1/2) acknowledges only after True, so a crash can never lose an acknowledged message.
#: Awaiting it is also the back-pressure. A sink that returns None (a test's) means "handed on".
BatchSink = Callable[[list[Sample]], Awaitable[bool | None]]


class PublishAhead:
    """Hands a source's batches to the sink without waiting for each commit, at most ``limit`` outstanding.

    The gateway's sink returns once the outbox has committed a batch. A source that acknowledges nothing upstream
    (a Modbus poll, a BACnet read) need not wait for that before it reads the next device: waiting put a transaction
    between every two polls, and gave the outbox one transaction per poll. Handed on, the polls queue on the bus while
    a transaction runs, and the store loop commits what queued in one (issue 19). The bound keeps the old
    back-pressure: a source ``limit`` batches ahead of the disk waits, as a blocked bus makes it wait anyway.

    Order is kept: each batch enters the bus in the order handed (tasks start in creation order, and a full bus wakes
    its waiters first come, first served). ``drain`` waits for every batch handed on; a sink's exception comes out of
    the next ``hand`` or ``drain``, as it came out of the ``await publish(...)`` it replaces."""

    __slots__ = ("_failed", "_limit", "_pending", "_publish")

    def __init__(self, publish: BatchSink, *, limit: int = 32) -> None:
        if limit < 1:
            raise ValueError("a source may have at least one batch outstanding")
        self._publish = publish
        self._limit = limit
        self._pending: set[asyncio.Task[bool | None]] = set()
        self._failed: BaseException | None = None

    def __len__(self) -> int:
        return len(self._pending)

    async def hand(self, batch: list[Sample]) -> None:
        self._raise_failure()
        while len(self._pending) >= self._limit:
            await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
            self._raise_failure()
        task = asyncio.ensure_future(self._publish(batch))
        self._pending.add(task)
        task.add_done_callback(self._done)

    async def drain(self) -> None:
        """Wait until the sink has taken (and stored) everything handed on."""
        while self._pending:
            await asyncio.wait(set(self._pending))
        self._raise_failure()

    def _done(self, task: asyncio.Task[bool | None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None and self._failed is None:
            self._failed = task.exception()

    def _raise_failure(self) -> None:
        failed, self._failed = self._failed, None
        if failed is not None:
            raise failed


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


class PollClock:
    """Due times of one device's poll groups (one per interval), kept in phase: a late poll does not shift the
    following ones, and polls missed while busy are skipped, not bunched up. Pure: time is passed in."""

    __slots__ = ("due",)

    def __init__(self, intervals: Sequence[float], start: float) -> None:
        self.due = dict.fromkeys(intervals, start)

    def take_due(self, now: float) -> tuple[float, ...]:
        """The intervals due at ``now``, each advanced to its next slot after ``now``."""
        taken: list[float] = []
        for interval, due in self.due.items():
            if due <= now:
                taken.append(interval)
                missed = math.floor((now - due) / interval) + 1
                self.due[interval] = due + missed * interval
        return tuple(taken)

    def next_due(self) -> float:
        return min(self.due.values())

    def restart(self, now: float) -> None:
        """Make every interval due at ``now`` (after a reconnect: read at once, not at the next slot)."""
        self.due = dict.fromkeys(self.due, now)


def device_breaker(
    name: str,
    backoff_min: float,
    backoff_max: float,
    *,
    clock: Callable[[], float],
    jitter: Callable[[], float],
    logger: logging.Logger,
) -> ReconnectPolicy:
    """The breaker of one device on a shared bus or network: a silent device is skipped from ``backoff_min`` up to
    ``backoff_max`` seconds (doubling, with jitter) so it never stalls the others. ``logger`` is the driver's, so its
    one line per outage names the driver that saw it."""
    return ReconnectPolicy(
        name, RetryTiming(first=backoff_min, maximum=backoff_max), clock=clock, random=jitter, logger=logger
    )


_SectionT = TypeVar("_SectionT", bound="StrictModel")
_DeviceT = TypeVar("_DeviceT", bound="DeviceEntry")
_ProfileT = TypeVar("_ProfileT")
#: a section (a bus, a network) and its devices with their profiles
Section = tuple[_SectionT, list[tuple[_DeviceT, _ProfileT]]]


def site_sections(
    site: Site,
    key: str,
    *,
    section: type[_SectionT],
    device: type[_DeviceT],
    profile: type[_ProfileT],
    belongs: Callable[[_SectionT, _DeviceT], bool],
) -> list[Section[_SectionT, _DeviceT, _ProfileT]]:
    """Each ``key`` entry of the site (``modbus_buses``, ``bacnet_networks``) with the devices ``belongs`` to it and
    their profiles, all in the order of the site file. An entry without devices is kept: ``plan`` names it, while
    ``build_sources`` makes no source of it."""
    sections: list[Section[_SectionT, _DeviceT, _ProfileT]] = []
    for entry in site.config.section(key, section):
        devices: list[tuple[_DeviceT, _ProfileT]] = []
        for candidate in site.config.devices:
            if isinstance(candidate, device) and belongs(entry, candidate):
                found = site.profiles[candidate.id]
                assert isinstance(found, profile)  # load_site validated each device with its driver's model
                devices.append((candidate, found))
        sections.append((entry, devices))
    return sections


def print_site_plans(
    site_path: Path,
    load: Callable[[Path], Site],
    key: str,
    sections: Callable[[Site], list[Section[_SectionT, _DeviceT, _ProfileT]]],
    explain: Callable[[_SectionT, list[tuple[_DeviceT, _ProfileT]]], str],
) -> int:
    """The ``plan`` command of a polling driver: ``explain`` each of the site file's ``sections`` (its ``key``
    entries) with its devices. Returns the exit status (1: the site file has errors, printed to stderr). ``load`` is
    ``gateway.config.site.load_site``, passed in because that module reaches this one (through the plugins)."""
    try:
        site = load(site_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    found = sections(site)
    if not found:
        print(f"{site_path}: no {key}")
        return 0
    for entry, devices in found:
        print(explain(entry, devices))
    return 0
