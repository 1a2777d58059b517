"""One scheduler per physical Modbus bus: the ``Source`` the supervisor runs for each ``modbus_buses:`` entry.

Owns ``ModbusBusSource`` (polling, writes, per-slave breakers, reconnects, adaptive reads, device status) and
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
* a coalesced read refused with exception 3 (too many registers) or 2 (a hole) is read again in halves, down to
  single points, in the same poll, so its points are not BAD; the sizes answered and refused bound the device's
  limit, the next polls plan between the bounds until they meet (``ReadLimit``: exact within a few polls), and the
  limit holds for the session (reported in its status ``info`` and by ``modbus plan --probe``); a refused read
  through a hole stops hole filling;
* device states: ``online``; ``degraded`` (some reads refused, others answered: the refused points BAD);
  ``offline`` (every read refused, or the link is down); ``disabled`` (silent, skipped by its breaker until the
  next try). One word each, the same in the API, the page and drivers/modbus/README.md;
* a silent slave (after ``retries``) is skipped for the rest of the cycle and its breaker opens: tried again after
  ``backoff_min`` doubling to ``backoff_max``, with jitter (``gateway.reconnect``); it never stalls the others;
* a lost connection is re-opened fast (``reconnect_min``, doubling to ``reconnect_max``, with jitter) and, once
  back, every device is polled at once; the first answered read (not the connect) resets the backoff;
* while the link is down or a slave is disabled, every poll cycle still publishes one BAD sample per due point, so
  an outage is explicit interval by interval; failed reads and skipped cycles are counted by reason in the
  device's status (``failures``); each outage and each recovery is logged once, for the bus and for each device.
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
from drivers.modbus.config import BIT_TABLES, ModbusBusConfig, ModbusDeviceConfig, ModbusPoint, ModbusProfile
from drivers.modbus.planner import (
    PlanInput,
    ReadRequest,
    configured_max_registers,
    device_points,
    plan_device,
    split_request,
)
from gateway.driver_api import (
    BatchSink,
    DeviceState,
    DeviceStatus,
    PollClock,
    PublishAhead,
    Section,
    device_breaker,
    site_sections,
)
from gateway.errors import DeviceError, DeviceRejected, DeviceUnavailable, WriteRejected
from gateway.model import Command, Quality, Sample
from gateway.reconnect import ReconnectPolicy, RetryTiming

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


#: exception codes after which a coalesced read is split and retried in smaller pieces: 3 (illegal data value:
#: "too many registers" on many meters) and 2 (illegal data address: a hole read through)
_SPLIT_CODES = frozenset({2, 3})


class ReadLimit:
    """What a device's exception-3 refusals taught about its register limit this session: ``accepted`` (the
    largest read it answered) and ``refused`` (the smallest it refused). While they are apart the plan uses the
    size between them, so each poll halves the gap and the limit is exact within a few polls; once they meet, the
    plan uses the proven size. Pure: the scheduler feeds it the sizes of its reads."""

    __slots__ = ("accepted", "refused")

    def __init__(self) -> None:
        self.accepted = 0
        self.refused: int | None = None

    @property
    def learning(self) -> bool:
        """True once the device refused a read it then answered in pieces: its limit is being learned."""
        return self.refused is not None and self.accepted > 0

    @property
    def exact(self) -> bool:
        return self.refused is not None and 0 < self.accepted >= self.refused - 1

    @property
    def proven(self) -> int:
        """The largest read known to be answered and below every refusal (0 while nothing is learned)."""
        if self.refused is None:
            return 0
        return min(self.accepted, self.refused - 1)

    def plan_limit(self) -> int | None:
        """The most registers the next plan may ask for in one read; None when nothing was learned."""
        if self.refused is None or not self.accepted:
            return None
        high = self.refused - 1
        low = min(self.accepted, high)
        return high if low >= high else (low + high + 1) // 2

    def saw_refusal(self, count: int) -> bool:
        """A read of ``count`` registers refused with exception 3; True when that changes what is known."""
        if self.refused is None or count < self.refused:
            self.refused = count
            return True
        return False

    def saw_answer(self, count: int) -> bool:
        """A read of ``count`` registers answered; True when that changes what is known."""
        if count > self.accepted and (self.refused is None or count < self.refused):
            self.accepted = count
            return self.refused is not None
        return False


@dataclass(eq=False)
class _Device:
    config: ModbusDeviceConfig
    profile: ModbusProfile
    status: DeviceStatus
    breaker: ReconnectPolicy
    groups: dict[float, list[PlanInput]]
    clock: PollClock
    #: due intervals -> reads, so a combination is planned once (cleared when the device teaches us a limit)
    plans: dict[tuple[float, ...], list[ReadRequest]] = field(default_factory=dict)
    #: the register limit learned from the device's exception-3 refusals, this session
    limit: ReadLimit = field(default_factory=ReadLimit)
    #: the device refused a read through a hole (exception 2) that it accepted in pieces: plan without fill
    learned_no_fill: bool = False

    def due_points(self, due: tuple[float, ...]) -> list[str]:
        return [point for interval in due for point, _spec in self.groups.get(interval, ())]


@dataclass(slots=True)
class _PollResult:
    """What one poll of one device found: reads answered, the first refusal, the first silence."""

    answered: int = 0
    rejected: str | None = None
    unavailable: str | None = None
    #: the silence was the connection dying, not the slave: the bus reconnects, the slave is not disabled
    link_lost: bool = False


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


#: ``tuple.__new__(Sample, (point, value, ts, quality, reason))`` builds a Sample in C (every field given:
#: defaults are not applied); ``Sample(...)`` goes through the
#: NamedTuple's Python-level ``__new__``, which costs more than decoding the value did
_new_tuple = tuple.__new__


class _OutageReporter:
    """While a bus is down: at each device's poll slots, one BAD sample per due point (value None), so an outage is
    explicit interval by interval downstream rather than implied by missing samples. Runs as its own task so the
    slots keep coming while the reconnect waits or a connect attempt hangs; ``stop()`` ends it between batches,
    never in the middle of a publish."""

    def __init__(self, devices: Sequence[_Device], publish: BatchSink, clock: Callable[[], float]) -> None:
        self._devices = devices
        self._publish = publish
        self._clock = clock
        self._done = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="modbus.outage")

    async def _run(self) -> None:
        while not self._done.is_set():
            now = self._clock()
            for device in self._devices:
                due = device.clock.take_due(now)
                if due:
                    device.status.count_failure("link_down")
                    await self._publish(_bad_points(device.due_points(due), time.time_ns(), "link_down"))
            wait = min(d.clock.next_due() for d in self._devices) - self._clock()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._done.wait(), timeout=wait)

    async def stop(self) -> None:
        self._done.set()
        await self._task


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
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not devices:
            raise ValueError(f"bus {bus.id} has no devices")
        self.name = f"modbus[{bus.id}]"
        self._bus = bus
        self._link_factory = link_factory
        self._clock = clock
        self._write_timeout = write_timeout
        now = clock()
        #: the link's reconnect policy: reset by the first read answered after a reconnect, not by the connect
        self._link_policy = ReconnectPolicy(
            self.name,
            RetryTiming(first=bus.reconnect_min, maximum=bus.reconnect_max),
            clock=clock,
            random=jitter,
            logger=log,
        )
        self._devices: list[_Device] = []
        self._points: dict[str, tuple[_Device, ModbusPoint]] = {}
        for config, profile in devices:
            if config.bus != bus.id:
                raise ValueError(f"device {config.id} is on bus {config.bus}, not {bus.id}")
            groups = device_points(config, profile)
            breaker = device_breaker(
                f"{self.name} {config.id} (unit {config.unit})",
                bus.backoff_min,
                bus.backoff_max,
                clock=clock,
                jitter=jitter,
                logger=log,
            )
            status = DeviceStatus(config.id, "modbus")
            status.info["max_registers"] = configured_max_registers(bus, config, profile)
            device = _Device(config, profile, status, breaker, groups, PollClock(list(groups), now))
            self._devices.append(device)
            for name, spec in profile.points.items():
                self._points[f"{config.id}.{name}"] = (device, spec)
        self._device_ids = frozenset(d.config.id for d in self._devices)
        self._writes: deque[_PendingWrite] = deque()
        self._wake: asyncio.Event | None = None
        self._running = False
        self._link_up = False
        self._last_frame_end = 0.0

    @property
    def devices(self) -> frozenset[str]:
        return self._device_ids

    def status(self) -> list[DeviceStatus]:
        return [d.status for d in self._devices]

    @property
    def link_policy(self) -> ReconnectPolicy:
        """The bus link's reconnect policy (read it; the source drives it)."""
        return self._link_policy

    def learned_limits(self) -> dict[str, int]:
        """Device id -> the read limit (registers) learned from its exception-3 refusals this session."""
        return {d.config.id: d.limit.proven for d in self._devices if d.limit.learning}

    def learning_limits(self) -> bool:
        """True while some device's register limit is known only as a range (each poll narrows it)."""
        return any(d.limit.learning and not d.limit.exact for d in self._devices)

    # ------------------------------------------------------------------ run loop

    async def run(self, publish: BatchSink, stopping: asyncio.Event) -> None:
        self._wake = asyncio.Event()
        self._running = True
        reporter: _OutageReporter | None = None
        # a poll acknowledges nothing upstream: the next device is read while the last poll is being stored
        ahead = PublishAhead(publish)
        try:
            while not stopping.is_set():
                try:
                    async with self._link_factory(self._bus) as link:
                        if reporter is not None:
                            await reporter.stop()
                            reporter = None
                        self._link_up = True
                        if self._link_policy.down:
                            # back after an outage: poll every device now rather than at its next slot, so
                            # readings return as soon as the device does (the phase shifts once per outage)
                            now = self._clock()
                            for device in self._devices:
                                device.clock.restart(now)
                        try:
                            await self._poll_loop(link, ahead.hand, stopping)
                        finally:
                            self._link_up = False
                except (DeviceUnavailable, _LinkLost) as exc:
                    reason = f"connection lost ({exc})"
                    if not self._link_policy.down:
                        self._mark_bus_down(reason)
                    wait = self._link_policy.failed(reason)
                    self._fail_writes(DeviceUnavailable(f"{self.name} is not connected"))
                    if reporter is None:
                        # one BAD sample per point per poll slot for as long as the link is down, including
                        # while a connect attempt hangs (a cut cable costs a connect timeout per attempt)
                        reporter = _OutageReporter(self._devices, publish, self._clock)
                    await self._sleep(wait, stopping)
        finally:
            if reporter is not None:
                await reporter.stop()
            self._running = False
            self._fail_writes(DeviceUnavailable(f"{self.name} stopped"))
            await ahead.drain()  # everything read is published before run returns

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

    async def _poll_device(self, link: Link, device: _Device, due: tuple[float, ...], publish: BatchSink) -> None:
        now = self._clock()
        if not device.breaker.allows(now):
            # disabled (its breaker is open): not asked, but its points are still reported BAD for this interval
            device.status.count_failure("disabled")
            await publish(_bad_points(device.due_points(due), time.time_ns(), "disabled"))
            return
        requests = device.plans.get(due)
        if requests is None:
            requests = device.plans[due] = plan_device(
                self._bus,
                device.config,
                device.profile,
                due,
                learned_registers=device.limit.plan_limit(),
                learned_no_fill=device.learned_no_fill,
            )
        samples: list[Sample] = []
        result = _PollResult()
        started = now
        for request in requests:
            if result.unavailable is not None:
                _bad(request, samples, time.time_ns(), "no_answer")  # the slave is silent: skip its other reads
                continue
            if self._writes:
                await self._drain_writes(link)
            mark = len(samples)
            try:
                await self._read_adaptive(link, device, request, samples, result)
            except DeviceUnavailable as exc:
                result.unavailable = str(exc)
                result.link_lost = not link.connected
                why = "link_lost" if result.link_lost else "no_answer"
                device.status.count_failure(why)
                # pieces of a split read may have answered before the silence: keep them, BAD the rest
                read = {s.point for s in samples[mark:]}
                ts = time.time_ns()
                samples.extend(Sample(p, None, ts, Quality.BAD, why) for p in request.point_ids if p not in read)
        await publish(samples)
        self._record(device, result, self._clock() - started)
        if result.link_lost:
            raise _LinkLost(result.unavailable or "link lost")

    async def _read_adaptive(
        self, link: Link, device: _Device, request: ReadRequest, samples: list[Sample], result: _PollResult
    ) -> int:
        """Read ``request`` into ``samples``; when the device refuses it with exception 3 or 2 and it carries more
        than one point, read it in halves (recursively, down to single points) and learn from which sizes were
        accepted. Returns the largest read (registers or bits) that was answered, 0 if none."""
        try:
            await self._read_into(link, request, samples)
        except DeviceRejected as exc:
            code = exc.code
            if code not in _SPLIT_CODES or len(request.points) < 2:
                result.rejected = result.rejected or str(exc)
                why = f"exception_{code}" if code is not None else "bad_answer"
                device.status.count_failure(why)
                _bad(request, samples, time.time_ns(), why)
                return 0
        else:
            result.answered += 1
            limit = device.limit
            if limit.refused is not None and request.table not in BIT_TABLES and limit.saw_answer(request.count):
                self._limit_changed(device, request.count)
            return request.count
        device.status.count_failure(f"exception_{code}")
        if code == 3 and request.table not in BIT_TABLES and device.limit.saw_refusal(request.count):
            self._limit_changed(device, request.count)
        first, second = split_request(request, device.profile.order)
        answered = max(
            await self._read_adaptive(link, device, first, samples, result),
            await self._read_adaptive(link, device, second, samples, result),
        )
        if answered and code == 2 and request.fill and not device.learned_no_fill:
            self._learn_no_fill(device, request)
        return answered

    def _limit_changed(self, device: _Device, count: int) -> None:
        """Re-plan within what the device taught, report it, and log the start and the end of the learning."""
        limit = device.limit
        device.plans.clear()
        if not limit.learning:
            return  # refused, but nothing answered yet: its pieces will tell
        where = f"{self.name} {device.config.id} (unit {device.config.unit})"
        info = device.status.info
        first = "max_registers_learned" not in info
        info["max_registers"] = limit.proven
        info["max_registers_learned"] = "exact" if limit.exact else "learning"
        if first:
            log.warning(
                "%s: refused a read of %d registers (exception 3) and answered %d; reading in smaller pieces and "
                "learning its limit",
                where,
                limit.refused,
                limit.proven,
            )
        if limit.exact:
            log.warning(
                "%s: answers at most %d registers per read (learned; set max_registers: %d on the device to start "
                "there)",
                where,
                limit.proven,
                limit.proven,
            )

    def _learn_no_fill(self, device: _Device, refused: ReadRequest) -> None:
        """A read through a hole was refused (exception 2) and its pieces answered: plan without holes."""
        device.learned_no_fill = True
        device.status.info["max_fill_learned"] = 0
        device.plans.clear()
        log.warning(
            "%s %s (unit %d): refused a read through %d unmapped registers (exception 2) and answered the pieces; "
            "no longer reading through holes (set max_fill: 0 in its profile to start there)",
            self.name,
            device.config.id,
            device.config.unit,
            refused.fill,
        )

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
        positions = block.float_positions
        if positions:
            # NaN/inf is how devices say "no valid reading": forwarded as BAD, never as a number. One C-level sum
            # answers "all finite?" for the whole read (a NaN or infinity, or an overflow of large doubles, makes it
            # non-finite; a finite sum means every term is); only a read that fails it is looked at point by point.
            floats = values if len(positions) == len(values) else [values[p] for p in positions]
            if not math.isfinite(sum(floats)):  # type: ignore[arg-type]  # float_positions hold floats only
                _extend_with_bad_floats(request, values, ts, samples)
                return
        samples.extend(
            map(_new_tuple, repeat(Sample), zip(request.point_ids, values, repeat(ts), repeat(_GOOD), repeat(None)))
        )

    async def _frame_gap(self) -> None:
        gap = self._bus.gap_s
        if gap:
            wait = self._last_frame_end + gap - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)

    def _record(self, device: _Device, result: _PollResult, latency: float) -> None:
        status = device.status
        if result.unavailable is not None:
            status.record_error(result.unavailable)
            if result.link_lost:
                return  # the bus reconnects (run): the slave itself is not to blame, so it is not disabled
            # the policy logs the outage once (and its end once); the wait doubles while the slave stays silent
            device.breaker.failed(f"not answering ({result.unavailable}); its points are BAD")
            status.state = DeviceState.DISABLED
            return
        # proven success: the first answer (a value or a refusal) resets the link's and the slave's backoff
        self._link_policy.succeeded()
        device.breaker.succeeded()
        if result.rejected is None:
            outage_start, before = status.since_ns, status.state
            if status.record_ok(latency) or before is DeviceState.DEGRADED:
                log.info(
                    "%s %s: every read answered again after %.1fs",
                    self.name,
                    device.config.id,
                    (status.since_ns - outage_start) / 1e9,
                )
            return
        where = f"{self.name} {device.config.id} (unit {device.config.unit})"
        if result.answered:
            if status.record_partial(latency, result.rejected):
                log.warning("%s: degraded, some reads refused (%s); those points are BAD", where, result.rejected)
            return
        if status.record_error(result.rejected):
            log.warning("%s: refused every read (%s); its points are BAD until it answers", where, result.rejected)

    def _mark_bus_down(self, reason: str) -> None:
        for device in self._devices:
            device.status.record_error(reason)
            device.status.state = DeviceState.OFFLINE

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
        sent), DeviceUnavailable (bus down, device disabled, or no answer) or DeviceRejected (the device
        refused, or read back something else)."""
        pending = self._prepare_write(command)
        if not self._running or self._wake is None:
            raise DeviceUnavailable(f"{self.name} is not running")
        if self._link_policy.down and not self._link_up:
            # in an outage a queued write could only wait for its timeout: say so now (at start-up, before the
            # first connect, it is queued as usual)
            raise DeviceUnavailable(f"{self.name} is not connected; write not sent")
        if not pending.device.breaker.allows(self._clock()):
            device = pending.device.config.id
            raise DeviceUnavailable(f"{device} is not answering (disabled until its next try); write not sent")
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
        if command.relinquish or command.priority is not None:
            # Modbus has no priority array: a register holds one value, so a slot to release or pick does not exist;
            # saying so beats writing the value as if the priority had been honoured
            what = "a relinquish" if command.relinquish else f"priority {command.priority}"
            raise WriteRejected(
                f"{command.point}: Modbus has no write priorities, {what} cannot be honoured (remove priority/"
                "relinquish from its allow entry, or write a value)"
            )
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
            samples.append(Sample(point, None, ts, Quality.BAD, "not_finite"))
        else:
            samples.append(Sample(point, value, ts, Quality.GOOD))


def _bad(request: ReadRequest, samples: list[Sample], ts: int, reason: str) -> None:
    samples.extend(Sample(planned.point, None, ts, Quality.BAD, reason) for planned in request.points)


def _bad_points(points: Sequence[str], ts: int, reason: str) -> list[Sample]:
    return [Sample(point, None, ts, Quality.BAD, reason) for point in points]


def bus_devices(site: Site) -> list[Section[ModbusBusConfig, ModbusDeviceConfig, ModbusProfile]]:
    """Each bus of the site with its devices and their profiles, in the order of the site file."""
    return site_sections(
        site,
        "modbus_buses",
        section=ModbusBusConfig,
        device=ModbusDeviceConfig,
        profile=ModbusProfile,
        belongs=lambda bus, device: device.bus == bus.id,
    )


def build_sources(site: Site) -> list[ModbusBusSource]:
    """One source per bus that has devices, in the order of the site file."""
    return [ModbusBusSource(bus, devices) for bus, devices in bus_devices(site) if devices]
