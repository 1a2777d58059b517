"""One scheduler per physical Modbus bus: the ``Source`` the supervisor runs for each ``modbus_buses:`` entry.

Owns ``ModbusBusSource`` (polling, writes, per-slave breakers, reconnect with backoff, device status) and
``build_sources(site)``. Talks to the wire only through a link (``drivers.modbus.client.ModbusLink`` by default,
injected as ``link_factory=`` so tests can pass their own); never imports pymodbus itself.

Behaviour, in the order it matters on a real RS-485 line:

* one request in flight per bus, with the serial inter-frame gap kept between frames;
* writes go ahead of polls: pending writes are sent before every read request, not just between cycles;
* the points of a device that are due together are read with the fewest requests (``planner``), one batch per
  device per poll, each value stamped with ``time.time_ns()`` when its read came back; a read's bytes are
  decoded by its request's precompiled ``BlockDecoder`` and its Samples built in C (the hot path: no per-point
  Python call);
* a failed read publishes BAD samples (value None) for exactly the points it carried, never a 0;
* a slave that does not answer (after ``retries``) is skipped for the rest of the cycle and backed off
  (``backoff_min`` doubling up to ``backoff_max``): it never stalls the others. While backed off its points are
  not re-published: its last batch (BAD) stands and its status says ``disabled``;
* a lost connection is re-opened with backoff (``reconnect_min`` .. ``reconnect_max``, with jitter); each outage
  and each recovery is logged once, for the bus and for each device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

from drivers.modbus.codec import EncodeError, Value, encode
from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig, ModbusPoint, ModbusProfile
from drivers.modbus.planner import PlanInput, ReadRequest, device_points, plan_device
from gateway.driver_api import BatchSink, DeviceState, DeviceStatus
from gateway.errors import DeviceError, DeviceRejected, DeviceUnavailable, WriteRejected
from gateway.model import Command, Quality, Sample

if TYPE_CHECKING:
    from gateway.config.site import Site

log = logging.getLogger("drivers.modbus")


class Link(Protocol):
    """What the scheduler needs of a connection (``ModbusLink`` is the real one)."""

    @property
    def connected(self) -> bool: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def read_registers(self, table: str, unit: int, address: int, count: int) -> list[int]: ...

    async def read_register_bytes(self, table: str, unit: int, address: int, count: int) -> bytes: ...

    async def read_bits(self, table: str, unit: int, address: int, count: int) -> list[bool]: ...

    async def write_registers(self, unit: int, address: int, values: list[int]) -> None: ...

    async def write_coil(self, unit: int, address: int, value: bool) -> None: ...


LinkFactory = Callable[[ModbusBusConfig], Link]


def _default_link(bus: ModbusBusConfig) -> Link:
    from drivers.modbus.client import ModbusLink  # pymodbus loads only when a Modbus bus actually runs

    return ModbusLink(bus)


class SlaveBreaker:
    """Per-slave circuit breaker: after a failure the slave is skipped until ``open_until``, the wait doubling
    from ``backoff_min`` to ``backoff_max`` while it keeps failing. Pure: time is passed in."""

    __slots__ = ("backoff", "backoff_max", "backoff_min", "open_until")

    def __init__(self, backoff_min: float, backoff_max: float) -> None:
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.backoff = backoff_min
        self.open_until = 0.0

    def allows(self, now: float) -> bool:
        return now >= self.open_until

    def trip(self, now: float) -> float:
        """Record a failure at ``now``; return how long the slave is now skipped."""
        wait = self.backoff
        self.open_until = now + wait
        self.backoff = min(self.backoff * 2, self.backoff_max)
        return wait

    def reset(self) -> None:
        self.backoff = self.backoff_min
        self.open_until = 0.0


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


@dataclass(eq=False)
class _Device:
    config: ModbusDeviceConfig
    profile: ModbusProfile
    status: DeviceStatus
    breaker: SlaveBreaker
    groups: dict[float, list[PlanInput]]
    clock: PollClock
    #: due intervals -> reads, so a combination is planned once
    plans: dict[tuple[float, ...], list[ReadRequest]] = field(default_factory=dict)


@dataclass(eq=False)
class _PendingWrite:
    device: _Device
    spec: ModbusPoint
    point: str
    registers: list[int] | None
    coil: bool | None
    done: asyncio.Future[None]


class _LinkLost(Exception):
    """The connection itself died during a poll: leave the link and reconnect."""


#: ``tuple.__new__(Sample, (point, value, ts, quality))`` builds a Sample in C; ``Sample(...)`` goes through the
#: NamedTuple's Python-level ``__new__``, which costs more than decoding the value did
_new_tuple = tuple.__new__


class ModbusBusSource:
    """Reads and writes every device on one bus. See the module docstring for the behaviour."""

    def __init__(
        self,
        bus: ModbusBusConfig,
        devices: Sequence[tuple[ModbusDeviceConfig, ModbusProfile]],
        *,
        link_factory: LinkFactory = _default_link,
        clock: Callable[[], float] = time.monotonic,
        write_timeout: float = 5.0,
    ) -> None:
        if not devices:
            raise ValueError(f"bus {bus.id} has no devices")
        self.name = f"modbus[{bus.id}]"
        self._bus = bus
        self._link_factory = link_factory
        self._clock = clock
        self._write_timeout = write_timeout
        now = clock()
        self._devices: list[_Device] = []
        self._points: dict[str, tuple[_Device, ModbusPoint]] = {}
        for config, profile in devices:
            if config.bus != bus.id:
                raise ValueError(f"device {config.id} is on bus {config.bus}, not {bus.id}")
            groups = device_points(config, profile)
            device = _Device(
                config,
                profile,
                DeviceStatus(config.id, "modbus"),
                SlaveBreaker(bus.backoff_min, bus.backoff_max),
                groups,
                PollClock(list(groups), now),
            )
            self._devices.append(device)
            for name, spec in profile.points.items():
                self._points[f"{config.id}.{name}"] = (device, spec)
        self._device_ids = frozenset(d.config.id for d in self._devices)
        self._writes: deque[_PendingWrite] = deque()
        self._wake: asyncio.Event | None = None
        self._running = False
        self._last_frame_end = 0.0

    @property
    def devices(self) -> frozenset[str]:
        return self._device_ids

    def status(self) -> list[DeviceStatus]:
        return [d.status for d in self._devices]

    # ------------------------------------------------------------------ run loop

    async def run(self, publish: BatchSink, stopping: asyncio.Event) -> None:
        self._wake = asyncio.Event()
        self._running = True
        delay = self._bus.reconnect_min
        outage_since: float | None = None
        try:
            while not stopping.is_set():
                try:
                    async with self._link_factory(self._bus) as link:
                        if outage_since is not None:
                            log.info("%s: reconnected after %.1fs", self.name, self._clock() - outage_since)
                            outage_since = None
                        delay = self._bus.reconnect_min
                        await self._poll_loop(link, publish, stopping)
                except (DeviceUnavailable, _LinkLost) as exc:
                    if outage_since is None:
                        outage_since = self._clock()
                        log.warning("%s: connection lost (%s); reconnecting with backoff", self.name, exc)
                        await self._publish_bus_down(publish, str(exc))
                    self._fail_writes(DeviceUnavailable(f"{self.name} is not connected"))
                    # jitter spreads reconnects of many gateways after a shared outage (a switch reboot)
                    await self._sleep(delay * random.uniform(0.8, 1.2), stopping)
                    delay = min(delay * 2, self._bus.reconnect_max)
        finally:
            self._running = False
            self._fail_writes(DeviceUnavailable(f"{self.name} stopped"))

    async def _poll_loop(self, link: Link, publish: BatchSink, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self._drain_writes(link)
            now = self._clock()
            polled = False
            for device in self._devices:
                due = device.clock.take_due(now)
                if not due:
                    continue
                polled = True
                await self._poll_device(link, device, due, publish)
                if stopping.is_set():
                    return
                if self._writes:
                    await self._drain_writes(link)
            if not polled:
                next_due = min(d.clock.next_due() for d in self._devices)
                await self._sleep(next_due - self._clock(), stopping)

    async def _poll_device(
        self, link: Link, device: _Device, due: tuple[float, ...], publish: BatchSink
    ) -> None:
        now = self._clock()
        if not device.breaker.allows(now):
            return  # backed off: its last (BAD) batch stands until it is tried again
        requests = device.plans.get(due)
        if requests is None:
            requests = device.plans[due] = plan_device(self._bus, device.config, device.profile, due)
        samples: list[Sample] = []
        unavailable: str | None = None
        rejected: str | None = None
        link_lost = False
        started = now
        for request in requests:
            if unavailable is not None:
                _bad(request, samples, time.time_ns())  # the slave is silent: do not send the rest of its reads
                continue
            if self._writes:
                await self._drain_writes(link)
            try:
                await self._read_into(link, request, samples)
            except DeviceUnavailable as exc:
                unavailable = str(exc)
                link_lost = not link.connected
                _bad(request, samples, time.time_ns())
            except DeviceRejected as exc:
                rejected = str(exc)
                _bad(request, samples, time.time_ns())
        await publish(samples)
        self._record(device, unavailable, rejected, self._clock() - started)
        if link_lost:
            raise _LinkLost(unavailable or "link lost")

    async def _read_into(self, link: Link, request: ReadRequest, samples: list[Sample]) -> None:
        attempts = self._bus.retries + 1
        block = request.block
        for attempt in range(attempts):
            if self._bus.gap_s:
                await self._frame_gap()
            try:
                if block is None:  # coils and discrete inputs
                    bits = await link.read_bits(request.table, request.unit, request.address, request.count)
                    ts = time.time_ns()
                    samples.extend(Sample(p.point, bits[p.offset], ts, Quality.GOOD) for p in request.points)
                    return
                wire = await link.read_register_bytes(request.table, request.unit, request.address, request.count)
                ts = time.time_ns()
                break
            except DeviceUnavailable:
                if attempt + 1 == attempts or not link.connected:
                    raise
            finally:
                self._last_frame_end = self._clock()
        assert block is not None  # a register read: the bit tables returned above
        values = block.decode(wire)
        for position in block.float_positions:
            value = values[position]
            if not math.isfinite(value):  # type: ignore[arg-type]  # float_positions hold floats only
                # NaN/inf is how devices say "no valid reading": forwarded as BAD, never as a number
                _extend_with_bad_floats(request, values, ts, samples)
                return
        samples.extend(map(_new_tuple, repeat(Sample), zip(request.point_ids, values, repeat(ts), repeat(_GOOD))))

    async def _frame_gap(self) -> None:
        gap = self._bus.gap_s
        if gap:
            wait = self._last_frame_end + gap - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)

    def _record(self, device: _Device, unavailable: str | None, rejected: str | None, latency: float) -> None:
        status, where = device.status, f"{self.name} {device.config.id} (unit {device.config.unit})"
        if unavailable is not None:
            wait = device.breaker.trip(self._clock())
            if status.record_error(unavailable):
                log.warning("%s: not answering (%s); skipping it, next try in %.0fs", where, unavailable, wait)
            status.state = DeviceState.DISABLED
            return
        device.breaker.reset()
        if rejected is not None:
            if status.record_error(rejected):
                log.warning("%s: refused a read (%s); its points are BAD until it answers", where, rejected)
            return
        outage_start = status.since_ns
        if status.record_ok(latency):
            log.info("%s: answering again after %.1fs", where, (status.since_ns - outage_start) / 1e9)

    async def _publish_bus_down(self, publish: BatchSink, reason: str) -> None:
        ts = time.time_ns()
        for device in self._devices:
            if device.status.record_error(reason):
                device.status.state = DeviceState.OFFLINE
            await publish([Sample(point, None, ts, Quality.BAD) for items in device.groups.values()
                           for point, _spec in items])

    async def _sleep(self, seconds: float, stopping: asyncio.Event) -> None:
        """Wait ``seconds``, or less when stopping is set or a write arrives."""
        if seconds <= 0 or stopping.is_set() or self._writes:
            return
        assert self._wake is not None
        self._wake.clear()
        waiters = [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            for waiter in waiters:
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter

    # ------------------------------------------------------------------ writes

    async def write(self, command: Command) -> None:
        """Check, encode and queue one write; it is sent ahead of the next read. Raises WriteRejected (never
        sent), DeviceUnavailable (bus down, device backed off, or no answer) or DeviceRejected (the device
        refused, or read back something else)."""
        pending = self._prepare_write(command)
        if not self._running or self._wake is None:
            raise DeviceUnavailable(f"{self.name} is not running")
        if not pending.device.breaker.allows(self._clock()):
            raise DeviceUnavailable(f"{pending.device.config.id} is not answering (backed off); write not sent")
        self._writes.append(pending)
        self._wake.set()
        try:
            await asyncio.wait_for(pending.done, timeout=self._write_timeout)
        except TimeoutError:
            raise DeviceUnavailable(f"write to {command.point} not done within {self._write_timeout:g}s") from None

    def _prepare_write(self, command: Command) -> _PendingWrite:
        target = self._points.get(command.point)
        if target is None:
            raise WriteRejected(f"{command.point} is not a point of {self.name}")
        device, spec = target
        if not spec.writable:
            raise WriteRejected(f"{command.point} is not writable (profile {device.config.profile})")
        value = command.value
        loop = asyncio.get_running_loop()
        if spec.table == "coil":
            if not isinstance(value, bool) and value not in (0, 1):
                raise WriteRejected(f"{command.point} is a coil: write true or false, not {value!r}")
            return _PendingWrite(device, spec, command.point, None, bool(value), loop.create_future())
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WriteRejected(f"{command.point} takes a number, not {value!r}")
        if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
            raise WriteRejected(
                f"{command.point}: {value!r} is outside the profile's bounds [{spec.min}, {spec.max}]; not sent"
            )
        try:
            registers = encode(spec, value, device.profile.order)
        except EncodeError as exc:
            raise WriteRejected(f"{command.point}: {exc}; not sent") from exc
        return _PendingWrite(device, spec, command.point, registers, None, loop.create_future())

    async def _drain_writes(self, link: Link) -> None:
        while self._writes:
            pending = self._writes.popleft()
            if pending.done.done():
                continue  # the caller gave up waiting: do not send a write nobody waits for
            try:
                await self._send_write(link, pending)
            except DeviceError as exc:
                if not pending.done.done():
                    pending.done.set_exception(exc)
                if not link.connected:
                    raise _LinkLost(str(exc)) from exc
            else:
                if not pending.done.done():
                    pending.done.set_result(None)

    async def _send_write(self, link: Link, pending: _PendingWrite) -> None:
        unit, spec = pending.device.config.unit, pending.spec
        await self._frame_gap()
        try:
            if pending.coil is not None:
                await link.write_coil(unit, spec.address, pending.coil)
            else:
                assert pending.registers is not None
                await link.write_registers(unit, spec.address, pending.registers)
        finally:
            self._last_frame_end = self._clock()
        log.info("%s: wrote %s (unit %d %s %d)", self.name, pending.point, unit, spec.table, spec.address)
        if not spec.readback:
            return
        await self._frame_gap()
        try:
            if pending.coil is not None:
                bits = await link.read_bits("coil", unit, spec.address, 1)
                matches = bits[0] == pending.coil
                found = str(bits[0])
            else:
                registers = await link.read_registers(spec.table, unit, spec.address, spec.width)
                matches = registers == pending.registers
                found = str(registers)
        finally:
            self._last_frame_end = self._clock()
        if not matches:
            raise DeviceRejected(f"{pending.point}: read back {found} after writing; the device did not keep it")

    def _fail_writes(self, error: DeviceError) -> None:
        while self._writes:
            pending = self._writes.popleft()
            if not pending.done.done():
                pending.done.set_exception(error)


_GOOD = Quality.GOOD


def _extend_with_bad_floats(request: ReadRequest, values: list[Value], ts: int, samples: list[Sample]) -> None:
    """The slow path of a read that holds a NaN or an infinity: those points BAD, the others GOOD."""
    for point, value in zip(request.point_ids, values, strict=True):
        if isinstance(value, float) and not math.isfinite(value):
            samples.append(Sample(point, None, ts, Quality.BAD))
        else:
            samples.append(Sample(point, value, ts, Quality.GOOD))


def _bad(request: ReadRequest, samples: list[Sample], ts: int) -> None:
    samples.extend(Sample(planned.point, None, ts, Quality.BAD) for planned in request.points)


def build_sources(site: Site) -> list[ModbusBusSource]:
    """One source per bus that has devices, in the order of the site file."""
    sources: list[ModbusBusSource] = []
    for bus in site.config.modbus_buses:
        devices: list[tuple[ModbusDeviceConfig, ModbusProfile]] = []
        for device in site.config.devices:
            if isinstance(device, ModbusDeviceConfig) and device.bus == bus.id:
                profile = site.profiles[device.id]
                assert isinstance(profile, ModbusProfile)
                devices.append((device, profile))
        if devices:
            sources.append(ModbusBusSource(bus, devices))
    return sources
