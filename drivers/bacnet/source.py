"""One source per BACnet/IP network: the ``Source`` the supervisor runs for each ``bacnet_networks:`` entry.

Owns ``BacnetNetworkSource`` (per-device polling, writes with priority and relinquish, per-device breakers, device
status), ``build_sources(site)`` and ``plan_site(site)``. Talks to the wire only through a link
(``drivers.bacnet.client.BacnetLink`` by default, injected as ``link_factory=``); never imports bacpypes3 itself.

Behaviour:

* each device runs in its own task, with one request in flight per device (a lock that writes share, so a write
  waits for at most one read, not a whole cycle); a silent device delays only itself;
* a device without an address is found by Who-Is at its first poll; its ``max-apdu-length-accepted`` and
  ``segmentation-supported`` are read from its device object, and its due points are read with the fewest
  ReadPropertyMultiple requests that fit (``planner``), each object's ``status-flags`` included;
* a device that refuses ReadPropertyMultiple (Reject unrecognized-service, or Error services) is read with one
  ReadProperty per point from then on, in the same poll (learned once, logged once, shown in its status ``info``);
* an RPM aborted as too big (segmentation-not-supported, buffer-overflow, apdu-too-long) is read again in halves;
* quality: a property the device could not read, or a value of the wrong type, is BAD (value None); a point of an
  object flagged fault or out-of-service is UNCERTAIN (its value kept); in-alarm and overridden keep GOOD; the flags
  of every flagged point are shown in the device's status ``info["flags"]``;
* a device that does not answer (after the network's ``retries``) is skipped by its breaker (``backoff_min``
  doubling to ``backoff_max``, with jitter, ``gateway.reconnect``) and its due points are published BAD at each
  slot, so an outage is explicit interval by interval; one log line when it starts and one when it ends;
* a write goes through ``writable``/``min``/``max`` of the profile and is sent at the point's priority; the string
  ``"relinquish"`` (or ``relinquish(point)``) writes NULL at that priority. A refusal by the device raises
  ``DeviceRejected`` with the device's reason and is never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

from drivers.bacnet.client import BacnetRefused, IAm, PropertyError, PropertyRef, ReadResult, Scalar
from drivers.bacnet.config import (
    BINARY_TYPES,
    MAX_APDU_BACNET_IP,
    BacnetDeviceConfig,
    BacnetNetworkConfig,
    BacnetPoint,
    BacnetProfile,
    ObjectId,
)
from drivers.bacnet.planner import PlannedPoint, ReadRequest, answer_budget, plan_reads, split_request
from gateway.driver_api import BatchSink, DeviceState, DeviceStatus
from gateway.errors import DeviceError, DeviceRejected, DeviceUnavailable, WriteRejected
from gateway.model import Command, Quality, Sample
from gateway.reconnect import ReconnectPolicy, RetryTiming

if TYPE_CHECKING:
    from gateway.config.site import Site

log = logging.getLogger("drivers.bacnet")

#: the command value that relinquishes a point's priority slot (writes NULL)
RELINQUISH = "relinquish"
#: Reject/Error reasons meaning "I do not do ReadPropertyMultiple"
_NO_RPM = frozenset({"unrecognized-service", "services service-request-denied", "services optional-functionality"})
#: Abort reasons meaning "that answer is too big for me"
_TOO_BIG = frozenset({"segmentation-not-supported", "buffer-overflow", "apdu-too-long"})
#: a device whose device object cannot be read is planned with the smallest APDU any BACnet device accepts
_MIN_APDU = 480


class Link(Protocol):
    """What the source needs of the BACnet/IP port (``BacnetLink`` is the real one)."""

    @property
    def connected(self) -> bool: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def read_property(self, address: str, obj: ObjectId, prop: str, index: int | None = None) -> Scalar: ...

    async def read_multiple(
        self, address: str, request: list[tuple[ObjectId, list[PropertyRef]]]
    ) -> list[ReadResult]: ...

    async def write_property(
        self, address: str, obj: ObjectId, prop: str, value: Scalar, priority: int | None
    ) -> None: ...

    async def who_is(
        self, low: int | None = None, high: int | None = None, address: str | None = None, seconds: float = 3.0
    ) -> list[IAm]: ...


LinkFactory = Callable[[BacnetNetworkConfig], Link]


def _default_link(network: BacnetNetworkConfig) -> Link:
    from drivers.bacnet.client import BacnetLink  # bacpypes3 loads only when a BACnet network actually runs

    return BacnetLink(network)


class _PollClock:
    """Due times of one device's poll groups, kept in phase; polls missed while busy are skipped, not bunched."""

    __slots__ = ("due",)

    def __init__(self, intervals: Sequence[float], start: float) -> None:
        self.due = dict.fromkeys(intervals, start)

    def take_due(self, now: float) -> tuple[float, ...]:
        taken: list[float] = []
        for interval, due in self.due.items():
            if due <= now:
                taken.append(interval)
                self.due[interval] = due + (math.floor((now - due) / interval) + 1) * interval
        return tuple(taken)

    def next_due(self) -> float:
        return min(self.due.values())


@dataclass(eq=False)
class _Device:
    config: BacnetDeviceConfig
    profile: BacnetProfile
    status: DeviceStatus
    breaker: ReconnectPolicy
    groups: dict[float, list[PlannedPoint]]
    clock: _PollClock
    address: str | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: None until the device object was read (max-APDU, segmentation)
    budget: int | None = None
    #: False once the device refused ReadPropertyMultiple (or the config says so)
    rpm: bool = True
    plans: dict[tuple[float, ...], list[ReadRequest]] = field(default_factory=dict)
    #: point -> its object's flags, for the points whose object is flagged
    flags: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.config.id} (device {self.config.instance})"

    def due_points(self, due: tuple[float, ...]) -> list[PlannedPoint]:
        return [p for interval in due for p in self.groups.get(interval, ())]


@dataclass(slots=True)
class _PollResult:
    answered: int = 0
    rejected: str | None = None
    unavailable: str | None = None
    requests: int = 0


_FLAG_NAMES = ("in-alarm", "fault", "overridden", "out-of-service")


def planned_points(device: BacnetDeviceConfig, profile: BacnetProfile) -> dict[float, list[PlannedPoint]]:
    """The device's points grouped by poll interval."""
    groups: dict[float, list[PlannedPoint]] = {}
    for name, spec in profile.points.items():
        planned = PlannedPoint(f"{device.id}.{name}", spec.object, spec.property, spec.index, spec.kind)
        groups.setdefault(device.interval_of(spec), []).append(planned)
    return groups


def _checked(value: object, kind: str) -> Scalar:
    """The value if it has the point's kind; raises ValueError otherwise (the point goes BAD)."""
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"not a finite number: {value!r}")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expected active/inactive, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {value!r}")
    return value


class BacnetNetworkSource:
    """Reads and writes every device of one BACnet/IP network. See the module docstring for the behaviour."""

    def __init__(
        self,
        network: BacnetNetworkConfig,
        devices: Sequence[tuple[BacnetDeviceConfig, BacnetProfile]],
        *,
        link_factory: LinkFactory = _default_link,
        clock: Callable[[], float] = time.monotonic,
        write_timeout: float | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not devices:
            raise ValueError(f"network {network.id} has no devices")
        self.name = f"bacnet[{network.id}]"
        self._network = network
        self._link_factory = link_factory
        self._clock = clock
        # one write is one confirmed request: its own retries plus a margin
        self._write_timeout = write_timeout or network.timeout * (network.retries + 1) + 1.0
        self._jitter = jitter
        self._link: Link | None = None
        self._link_policy = ReconnectPolicy(self.name, RetryTiming(first=1.0, maximum=30.0), clock=clock,
                                            random=jitter, logger=log)
        now = clock()
        self._devices: list[_Device] = []
        self._points: dict[str, tuple[_Device, BacnetPoint]] = {}
        for config, profile in devices:
            if config.network != network.id:
                raise ValueError(f"device {config.id} is on network {config.network}, not {network.id}")
            groups = planned_points(config, profile)
            breaker = ReconnectPolicy(
                f"{self.name} {config.id} (device {config.instance})",
                RetryTiming(first=network.backoff_min, maximum=network.backoff_max),
                clock=clock, random=jitter, logger=log,
            )
            device = _Device(
                config, profile, DeviceStatus(config.id, "bacnet"), breaker, groups, _PollClock(list(groups), now),
                config.address,
            )
            device.rpm = config.read_multiple is not False
            self._devices.append(device)
            for name, spec in profile.points.items():
                self._points[f"{config.id}.{name}"] = (device, spec)
        self._device_ids = frozenset(d.config.id for d in self._devices)

    @property
    def devices(self) -> frozenset[str]:
        return self._device_ids

    def status(self) -> list[DeviceStatus]:
        return [d.status for d in self._devices]

    def requests_per_cycle(self) -> dict[str, int]:
        """Device id -> requests one full poll of all its points takes now (after what was learned)."""
        result: dict[str, int] = {}
        for device in self._devices:
            every = tuple(device.groups)
            points = device.due_points(every)
            if not device.rpm:
                result[device.config.id] = len(points)
            else:
                result[device.config.id] = len(self._plan(device, every))
        return result

    # ------------------------------------------------------------------ run

    async def run(self, publish: BatchSink, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                async with self._link_factory(self._network) as link:
                    self._link = link
                    self._link_policy.succeeded()
                    async with asyncio.TaskGroup() as group:
                        for device in self._devices:
                            group.create_task(
                                self._device_loop(link, device, publish, stopping),
                                name=f"{self.name}.{device.config.id}",
                            )
                    return
            except DeviceUnavailable as exc:
                for device in self._devices:
                    device.status.record_error(str(exc))
                wait = self._link_policy.failed(str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), timeout=wait)
            finally:
                self._link = None

    async def _device_loop(self, link: Link, device: _Device, publish: BatchSink, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            now = self._clock()
            due = device.clock.take_due(now)
            if due:
                if device.breaker.allows(now):
                    samples = await self.poll_device(link, device, due)
                else:
                    device.status.count_failure("disabled")
                    samples = _bad(device.due_points(due), time.time_ns())
                await publish(samples)
            wait = device.clock.next_due() - self._clock()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), timeout=wait)

    # ------------------------------------------------------------------ polling

    async def poll_device(self, link: Link, device: _Device, due: tuple[float, ...]) -> list[Sample]:
        """One poll of ``due`` intervals of one device: every due point gets exactly one sample."""
        points = device.due_points(due)
        result = _PollResult()
        samples: list[Sample] = []
        started = self._clock()
        try:
            address = await self._prepare(link, device)
            if device.rpm:
                requests = self._plan(device, due)
                pending = list(requests)
                while pending and device.rpm:
                    request = pending.pop(0)
                    await self._read_rpm(link, device, address, request, samples=samples, result=result)
                if pending:  # RPM was refused mid-poll: the rest by ReadProperty
                    for request in pending:
                        await self._read_each(link, device, address, request.points, samples=samples, result=result)
            else:
                await self._read_each(link, device, address, points, samples=samples, result=result)
        except DeviceUnavailable as exc:
            result.unavailable = str(exc)
        # every due point gets a sample: the ones not read (device silent) BAD
        read = {s.point for s in samples}
        ts = time.time_ns()
        samples.extend(Sample(p.point, None, ts, Quality.BAD) for p in points if p.point not in read)
        self._record(device, result, self._clock() - started)
        return samples

    async def _prepare(self, link: Link, device: _Device) -> str:
        """The device's address (Who-Is when not configured) and its APDU budget (read from its device object)."""
        if device.address is None:
            found = await link.who_is(
                device.config.instance, device.config.instance, None, seconds=self._network.discover_timeout
            )
            if not found:
                raise DeviceUnavailable(f"no I-Am from device {device.config.instance} to a Who-Is")
            device.address = found[0].address
            device.status.info["address"] = device.address
            log.info("%s %s: found at %s", self.name, device.name, device.address)
        if device.budget is None:
            await self._read_limits(link, device, device.address)
        return device.address

    async def _read_limits(self, link: Link, device: _Device, address: str) -> None:
        obj = ObjectId("device", device.config.instance)
        max_apdu, segmentation = _MIN_APDU, "no-segmentation"
        try:
            async with device.lock:
                raw = await link.read_property(address, obj, "max-apdu-length-accepted")
            if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 50:
                max_apdu = raw
            async with device.lock:
                seg = await link.read_property(address, obj, "segmentation-supported")
            names = {0: "segmented-both", 1: "segmented-transmit", 2: "segmented-receive", 3: "no-segmentation"}
            segmentation = names.get(seg, "no-segmentation") if isinstance(seg, int) else str(seg)
        except BacnetRefused as exc:
            log.warning("%s %s: cannot read its device object (%s); planning with %d-byte answers",
                        self.name, device.name, exc, _MIN_APDU)
        max_apdu = min(max_apdu, MAX_APDU_BACNET_IP, device.config.max_apdu or MAX_APDU_BACNET_IP)
        device.budget = answer_budget(max_apdu, segmentation)
        device.status.info.update({"max_apdu": max_apdu, "segmentation": segmentation})

    def _plan(self, device: _Device, due: tuple[float, ...]) -> list[ReadRequest]:
        plan = device.plans.get(due)
        if plan is None:
            budget = device.budget if device.budget is not None else _MIN_APDU
            plan = plan_reads(device.due_points(due), budget=budget, max_properties=self._network.max_properties)
            device.plans[due] = plan
        return plan

    async def _read_rpm(
        self, link: Link, device: _Device, address: str, request: ReadRequest, *,
        samples: list[Sample], result: _PollResult,
    ) -> None:
        try:
            async with device.lock:
                result.requests += 1
                answer = await link.read_multiple(address, [(obj, list(refs)) for obj, refs in request.objects])
        except BacnetRefused as exc:
            if exc.reason in _NO_RPM:
                self._learn_no_rpm(device, exc)
                await self._read_each(link, device, address, request.points, samples=samples, result=result)
                return
            if exc.kind == "abort" and exc.reason in _TOO_BIG and request.properties > 1:
                device.status.count_failure(exc.reason.replace("-", "_"))
                for part in split_request(request):
                    await self._read_rpm(link, device, address, part, samples=samples, result=result)
                return
            device.status.count_failure(f"{exc.kind}_{exc.reason}".replace("-", "_").replace(" ", "_"))
            result.rejected = result.rejected or str(exc)
            samples.extend(_bad(request.points, time.time_ns()))
            return
        ts = time.time_ns()
        self._answered(device, request.points, answer, ts, samples=samples, result=result)

    def _answered(
        self, device: _Device, points: Sequence[PlannedPoint], answer: list[ReadResult], ts: int, *,
        samples: list[Sample], result: _PollResult,
    ) -> None:
        values: dict[tuple[ObjectId, str, int | None], object] = {}
        flags: dict[ObjectId, tuple[bool, ...]] = {}
        for obj, prop, index, value in answer:
            if prop == "status-flags" and isinstance(value, tuple):
                flags[obj] = value
            values[(obj, prop, index)] = value
        answered = False
        for point in points:
            key = (point.object, point.property, point.index)
            if key not in values:
                device.status.count_failure("missing_in_answer")
                result.rejected = result.rejected or f"{point.point}: not in the device's answer"
                samples.append(Sample(point.point, None, ts, Quality.BAD))
                continue
            raw = values[key]
            if isinstance(raw, PropertyError):
                device.status.count_failure(str(raw.error_code).replace("-", "_"))
                result.rejected = result.rejected or f"{point.point}: {raw}"
                samples.append(Sample(point.point, None, ts, Quality.BAD))
                continue
            try:
                value = _checked(raw, point.kind)
            except ValueError as exc:
                device.status.count_failure("unexpected_value")
                result.rejected = result.rejected or f"{point.point}: {exc}"
                samples.append(Sample(point.point, None, ts, Quality.BAD))
                continue
            answered = True
            quality = Quality.GOOD
            object_flags = flags.get(point.object)
            if object_flags is not None and any(object_flags):
                named = ",".join(n for n, on in zip(_FLAG_NAMES, object_flags, strict=False) if on)
                device.flags[point.point] = named
                if object_flags[1] or (len(object_flags) > 3 and object_flags[3]):
                    quality = Quality.UNCERTAIN  # fault or out-of-service: the value is not the process's
            else:
                device.flags.pop(point.point, None)
            samples.append(Sample(point.point, value, ts, quality))
        if answered:
            result.answered += 1
        device.status.info["flags"] = "; ".join(f"{p}: {f}" for p, f in sorted(device.flags.items())) or None

    async def _read_each(
        self, link: Link, device: _Device, address: str, points: Sequence[PlannedPoint], *,
        samples: list[Sample], result: _PollResult,
    ) -> None:
        """One ReadProperty per point (devices without ReadPropertyMultiple); no status-flags: that would double
        the requests to a device that is already the slowest kind."""
        for point in points:
            try:
                async with device.lock:
                    result.requests += 1
                    raw = await link.read_property(address, point.object, point.property, point.index)
            except BacnetRefused as exc:
                device.status.count_failure(f"{exc.kind}_{exc.reason}".replace("-", "_").replace(" ", "_"))
                result.rejected = result.rejected or str(exc)
                samples.append(Sample(point.point, None, time.time_ns(), Quality.BAD))
                continue
            self._answered(
                device, [point], [(point.object, point.property, point.index, raw)], time.time_ns(),
                samples=samples, result=result,
            )

    def _learn_no_rpm(self, device: _Device, exc: BacnetRefused) -> None:
        device.rpm = False
        device.status.info["read_multiple"] = f"refused ({exc.reason}): one ReadProperty per point"
        log.warning(
            "%s %s: refuses ReadPropertyMultiple (%s); reading one property per request from now on (set "
            "read_multiple: false on the device to start there)",
            self.name, device.name, exc.reason,
        )

    def _record(self, device: _Device, result: _PollResult, latency: float) -> None:
        status = device.status
        status.info["requests_last_poll"] = result.requests
        if result.unavailable is not None:
            status.record_error(result.unavailable)
            device.breaker.failed(f"not answering ({result.unavailable}); its points are BAD")
            status.state = DeviceState.DISABLED
            return
        device.breaker.succeeded()
        if result.rejected is None:
            before = status.state
            since = status.since_ns
            if status.record_ok(latency) or before is DeviceState.DEGRADED:
                log.info("%s %s: every read answered again after %.1fs", self.name, device.name,
                         (status.since_ns - since) / 1e9)
            return
        if result.answered:
            if status.record_partial(latency, result.rejected):
                log.warning("%s %s: degraded, some reads refused (%s); those points are BAD",
                            self.name, device.name, result.rejected)
            return
        if status.record_error(result.rejected):
            log.warning("%s %s: refused every read (%s); its points are BAD", self.name, device.name, result.rejected)

    # ------------------------------------------------------------------ writes

    async def write(self, command: Command) -> None:
        """Write one value at the point's priority, or relinquish it (value ``"relinquish"``). Raises
        WriteRejected (never sent), DeviceUnavailable (not running, no address, no answer) or DeviceRejected (the
        device refused: the reason is in the message; not retried)."""
        target = self._points.get(command.point)
        if target is None:
            raise WriteRejected(f"{command.point} is not a point of {self.name}")
        device, spec = target
        if not spec.writable:
            raise WriteRejected(f"{command.point} is not writable (profile {device.config.profile})")
        value = command.value
        wire: Scalar
        if value == RELINQUISH:
            wire = None
        elif spec.object.type in BINARY_TYPES:
            if not isinstance(value, bool) and value not in (0, 1):
                raise WriteRejected(f"{command.point} is a {spec.object.type}: write true or false, not {value!r}")
            wire = bool(value)
        else:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise WriteRejected(f"{command.point} takes a number, not {value!r}")
            if not math.isfinite(value):
                raise WriteRejected(f"{command.point}: {value!r} is not a finite number; not sent")
            if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
                raise WriteRejected(
                    f"{command.point}: {value!r} is outside the profile's bounds [{spec.min}, {spec.max}]; not sent"
                )
            if spec.kind == "int":
                if value != int(value):
                    raise WriteRejected(f"{command.point} takes a whole number (a state), not {value!r}")
                wire = int(value)
            else:
                wire = float(value)
        await self._send_write(device, spec, command.point, wire)

    async def relinquish(self, point: str, origin: str = "cli") -> None:
        """Write NULL at the point's priority: the device falls back to lower priorities or its default."""
        await self.write(Command(point, RELINQUISH, origin))

    async def _send_write(self, device: _Device, spec: BacnetPoint, point: str, value: Scalar) -> None:
        link = self._link
        if link is None:
            raise DeviceUnavailable(f"{self.name} is not running; write to {point} not sent")
        if device.address is None:
            raise DeviceUnavailable(f"{device.name} has not been found yet (no I-Am); write to {point} not sent")
        if not device.breaker.allows(self._clock()):
            raise DeviceUnavailable(f"{device.name} is not answering (disabled until its next try); write not sent")
        what = "relinquish" if value is None else f"write {value!r}"
        try:
            async with asyncio.timeout(self._write_timeout), device.lock:
                await link.write_property(device.address, spec.object, spec.property, value, spec.priority)
        except TimeoutError:
            raise DeviceUnavailable(f"{what} to {point} not done within {self._write_timeout:g}s") from None
        except BacnetRefused as exc:
            # a refusal (write-access-denied, value-out-of-range, ...) is the device's answer: never retried
            log.warning("%s: %s to %s at priority %d refused: %s", self.name, what, point, spec.priority, exc)
            raise DeviceRejected(f"{point}: the device refused the {what} at priority {spec.priority} "
                                 f"({exc.kind} {exc.reason})") from exc
        except DeviceError:
            raise
        log.info("%s: %s to %s (%s at priority %d)", self.name, what, point, spec.object, spec.priority)


def _bad(points: Sequence[PlannedPoint], ts: int) -> list[Sample]:
    return [Sample(p.point, None, ts, Quality.BAD) for p in points]


def networks_of(site: Site) -> list[BacnetNetworkConfig]:
    return list(getattr(site.config, "bacnet_networks", ()))


def build_sources(site: Site) -> list[BacnetNetworkSource]:
    """One source per BACnet network that has devices, in the order of the site file."""
    sources: list[BacnetNetworkSource] = []
    for network in networks_of(site):
        devices: list[tuple[BacnetDeviceConfig, BacnetProfile]] = []
        for device in site.config.devices:
            if isinstance(device, BacnetDeviceConfig) and device.network == network.id:
                profile = site.profiles[device.id]
                assert isinstance(profile, BacnetProfile)
                devices.append((device, profile))
        if devices:
            sources.append(BacnetNetworkSource(network, devices))
    return sources
