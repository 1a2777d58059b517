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
* COV (``cov:`` on a device): each object with a present-value point is subscribed and renewed by this module at
  half the lifetime; an object the device refuses COV for is polled; the points under COV are polled only every
  ``cov.verify`` (the safety net), and a polled value no notification brought means a silent subscription:
  subscribe again at once. A device back after an outage is subscribed again; stopping cancels the subscriptions;
* a foreign-device port (``foreign:``) shows its BBMD registration in every device's status (``info["bbmd"]``);
* a write goes through ``writable``/``min``/``max`` of the profile and is sent at the command's priority (its
  allowlist entry's) or else the point's profile priority; a command with ``relinquish`` (or ``relinquish(point)``)
  writes NULL at that same priority. A refusal by the device raises ``DeviceRejected`` with the device's reason and
  is never retried.
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

from drivers.bacnet.client import BacnetRefused, CovNotice, IAm, PropertyError, PropertyRef, ReadResult, Scalar
from drivers.bacnet.config import (
    ANALOG_TYPES,
    BINARY_TYPES,
    MAX_APDU_BACNET_IP,
    MULTISTATE_TYPES,
    RESERVED_PRIORITIES,
    BacnetDeviceConfig,
    BacnetNetworkConfig,
    BacnetPoint,
    BacnetProfile,
    ObjectId,
)
from drivers.bacnet.planner import PlannedPoint, ReadRequest, answer_budget, plan_reads, split_request
from gateway.driver_api import BatchSink, DeviceState, DeviceStatus, PollClock, Section, device_breaker, site_sections
from gateway.errors import DeviceError, DeviceRejected, DeviceUnavailable, WriteRejected
from gateway.model import Command, Quality, Sample
from gateway.reconnect import ReconnectPolicy, RetryTiming

if TYPE_CHECKING:
    from gateway.config.site import Site

log = logging.getLogger("drivers.bacnet")

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

    @property
    def notifications(self) -> asyncio.Queue[CovNotice]: ...

    async def subscribe_cov(
        self, address: str, obj: ObjectId, process_id: int, *, confirmed: bool, lifetime: int
    ) -> None: ...

    async def unsubscribe_cov(self, address: str, obj: ObjectId, process_id: int) -> None: ...

    @property
    def foreign_registration(self) -> str | None: ...


LinkFactory = Callable[[BacnetNetworkConfig], Link]


def _default_link(network: BacnetNetworkConfig) -> Link:
    from drivers.bacnet.client import BacnetLink  # bacpypes3 loads only when a BACnet network actually runs

    return BacnetLink(network)


@dataclass(eq=False)
class _Device:
    config: BacnetDeviceConfig
    profile: BacnetProfile
    status: DeviceStatus
    breaker: ReconnectPolicy
    groups: dict[float, list[PlannedPoint]]
    clock: PollClock
    address: str | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: None until the device object was read (max-APDU, segmentation)
    budget: int | None = None
    #: False once the device refused ReadPropertyMultiple (or the config says so)
    rpm: bool = True
    plans: dict[tuple[float, ...], list[ReadRequest]] = field(default_factory=dict)
    #: point -> its object's flags, for the points whose object is flagged
    flags: dict[str, str] = field(default_factory=dict)
    #: COV: object -> its present-value points, and the subscriber process id of each object
    cov_points: dict[ObjectId, list[PlannedPoint]] = field(default_factory=dict)
    cov_ids: dict[ObjectId, int] = field(default_factory=dict)
    #: every subscription of the device is in place (its points are then polled only at ``cov.verify``)
    cov_active: bool = False
    #: set to make the COV task subscribe again now (silent subscription found, device back after an outage)
    cov_resubscribe: asyncio.Event = field(default_factory=asyncio.Event)
    #: point -> the last value a notification brought, and object -> its COV increment (analog objects)
    cov_last: dict[str, object] = field(default_factory=dict)
    cov_increment: dict[ObjectId, float] = field(default_factory=dict)
    #: when the points under COV are next polled (the safety net)
    verify_at: float = 0.0

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
#: objects whose present-value a device can report by COV (ASHRAE 135 clause 13.1, standard COV properties)
_COV_TYPES = ANALOG_TYPES | BINARY_TYPES | MULTISTATE_TYPES


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
        self._link_policy = ReconnectPolicy(
            self.name, RetryTiming(first=1.0, maximum=30.0), clock=clock, random=jitter, logger=log
        )
        now = clock()
        #: subscriber process ids are unique per source, so a notification names its device and object
        self._next_process_id = 0
        self._cov_by_id: dict[int, _Device] = {}
        self._devices: list[_Device] = []
        self._points: dict[str, tuple[_Device, BacnetPoint]] = {}
        for config, profile in devices:
            if config.network != network.id:
                raise ValueError(f"device {config.id} is on network {config.network}, not {network.id}")
            groups = planned_points(config, profile)
            breaker = device_breaker(
                f"{self.name} {config.id} (device {config.instance})",
                network.backoff_min,
                network.backoff_max,
                clock=clock,
                jitter=jitter,
                logger=log,
            )
            device = _Device(
                config,
                profile,
                DeviceStatus(config.id, "bacnet"),
                breaker,
                groups,
                PollClock(list(groups), now),
                config.address,
            )
            device.rpm = config.read_multiple is not False
            if config.cov is not None:
                for planned in (p for group in groups.values() for p in group):
                    if planned.object.type in _COV_TYPES and planned.property == "present-value":
                        device.cov_points.setdefault(planned.object, []).append(planned)
                for obj in device.cov_points:
                    self._next_process_id += 1
                    device.cov_ids[obj] = self._next_process_id
            self._devices.append(device)
            for name, spec in profile.points.items():
                self._points[f"{config.id}.{name}"] = (device, spec)
        self._device_ids = frozenset(d.config.id for d in self._devices)
        self._cov_by_id = {pid: d for d in self._devices for pid in d.cov_ids.values()}

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
                            if device.cov_points:
                                group.create_task(
                                    self._cov_loop(link, device, stopping), name=f"{self.name}.{device.config.id}.cov"
                                )
                        if self._cov_by_id:
                            group.create_task(self._cov_dispatch(link, publish, stopping), name=f"{self.name}.cov")
                        if self._network.foreign is not None:
                            group.create_task(self._watch_registration(link, stopping), name=f"{self.name}.bbmd")
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
                    try:
                        samples = await self.poll_device(link, device, due)
                    except Exception as exc:  # a bug or a library surprise must not stop the other devices
                        log.exception("%s %s: poll failed unexpectedly; its points are BAD", self.name, device.name)
                        device.status.count_failure("internal_error")
                        device.status.record_error(f"internal error: {type(exc).__name__}: {exc}")
                        samples = _bad(device.due_points(due), time.time_ns())
                else:
                    device.status.count_failure("disabled")
                    samples = _bad(device.due_points(due), time.time_ns())
                await publish(samples)
            wait = device.clock.next_due() - self._clock()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), timeout=wait)

    async def _watch_registration(self, link: Link, stopping: asyncio.Event) -> None:
        """Show the BBMD registration in every device's status, and log its loss and its return once each."""
        foreign = self._network.foreign
        assert foreign is not None
        registered: bool | None = None
        while not stopping.is_set():
            state = link.foreign_registration or "unregistered"
            for device in self._devices:
                device.status.info["bbmd"] = f"{foreign.bbmd}: {state}"
            ok = state == "registered"
            if ok and registered is False:
                log.info("%s: registered with BBMD %s again", self.name, foreign.bbmd)
            elif not ok and state != "pending" and registered is not False:
                log.warning(
                    "%s: not registered with BBMD %s (%s); devices across it cannot be found",
                    self.name,
                    foreign.bbmd,
                    state,
                )
            if state != "pending":
                registered = ok
            # while pending look again soon: the first answer of the BBMD usually comes within milliseconds
            wait = 0.2 if state == "pending" else min(foreign.ttl / 2, 5.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=wait)

    # ------------------------------------------------------------------ polling

    async def poll_device(self, link: Link, device: _Device, due: tuple[float, ...]) -> list[Sample]:
        """One poll of ``due`` intervals of one device: every due point gets exactly one sample."""
        points = device.due_points(due)
        verify = False
        if device.cov_active:
            now = self._clock()
            verify = now >= device.verify_at
            if verify:
                assert device.config.cov is not None
                device.verify_at = now + device.config.cov.verify
            else:  # the subscriptions bring these values: poll only the others until the safety net is due
                points = [p for p in points if p.object not in device.cov_points]
                if not points:
                    return []
        result = _PollResult()
        samples: list[Sample] = []
        started = self._clock()
        try:
            address = await self._prepare(link, device)
            if device.rpm:
                requests = self._plan(device, due, points if len(points) < len(device.due_points(due)) else None)
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
        if verify:
            self._check_cov(device, samples)
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
            log.warning(
                "%s %s: cannot read its device object (%s); planning with %d-byte answers",
                self.name,
                device.name,
                exc,
                _MIN_APDU,
            )
        max_apdu = min(max_apdu, MAX_APDU_BACNET_IP, device.config.max_apdu or MAX_APDU_BACNET_IP)
        device.budget = answer_budget(max_apdu, segmentation)
        device.status.info.update({"max_apdu": max_apdu, "segmentation": segmentation})

    def _plan(
        self, device: _Device, due: tuple[float, ...], only: Sequence[PlannedPoint] | None = None
    ) -> list[ReadRequest]:
        """The requests for the due points (or ``only`` these: the due points not under COV), planned once."""
        key = (*due, -1.0) if only is not None else due  # -1: the plan without the points under COV
        plan = device.plans.get(key)
        if plan is None:
            budget = device.budget if device.budget is not None else _MIN_APDU
            points = only if only is not None else device.due_points(due)
            plan = plan_reads(points, budget=budget, max_properties=self._network.max_properties)
            device.plans[key] = plan
        return plan

    async def _read_rpm(
        self,
        link: Link,
        device: _Device,
        address: str,
        request: ReadRequest,
        *,
        samples: list[Sample],
        result: _PollResult,
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
            device.status.count_failure(_failure_key(exc))
            result.rejected = result.rejected or str(exc)
            samples.extend(_bad(request.points, time.time_ns()))
            return
        ts = time.time_ns()
        self._answered(device, request.points, answer, ts, samples=samples, result=result)

    def _answered(
        self,
        device: _Device,
        points: Sequence[PlannedPoint],
        answer: list[ReadResult],
        ts: int,
        *,
        samples: list[Sample],
        result: _PollResult,
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
        self,
        link: Link,
        device: _Device,
        address: str,
        points: Sequence[PlannedPoint],
        *,
        samples: list[Sample],
        result: _PollResult,
    ) -> None:
        """One ReadProperty per point (devices without ReadPropertyMultiple); no status-flags: that would double
        the requests to a device that is already the slowest kind."""
        for point in points:
            try:
                async with device.lock:
                    result.requests += 1
                    raw = await link.read_property(address, point.object, point.property, point.index)
            except BacnetRefused as exc:
                device.status.count_failure(_failure_key(exc))
                result.rejected = result.rejected or str(exc)
                samples.append(Sample(point.point, None, time.time_ns(), Quality.BAD))
                continue
            self._answered(
                device,
                [point],
                [(point.object, point.property, point.index, raw)],
                time.time_ns(),
                samples=samples,
                result=result,
            )

    def _learn_no_rpm(self, device: _Device, exc: BacnetRefused) -> None:
        device.rpm = False
        device.status.info["read_multiple"] = f"refused ({exc.reason}): one ReadProperty per point"
        log.warning(
            "%s %s: refuses ReadPropertyMultiple (%s); reading one property per request from now on (set "
            "read_multiple: false on the device to start there)",
            self.name,
            device.name,
            exc.reason,
        )

    def _record(self, device: _Device, result: _PollResult, latency: float) -> None:
        status = device.status
        status.info["requests_last_poll"] = result.requests
        if result.unavailable is not None:
            status.record_error(result.unavailable)
            device.breaker.failed(f"not answering ({result.unavailable}); its points are BAD")
            status.state = DeviceState.DISABLED
            if device.cov_active:
                device.cov_active = False  # poll everything until it answers and is subscribed again
            return
        if device.breaker.succeeded() is not None and device.cov_points:
            device.cov_resubscribe.set()  # back after an outage: it may have restarted and forgotten us
        if result.rejected is None:
            before = status.state
            since = status.since_ns
            if status.record_ok(latency) or before is DeviceState.DEGRADED:
                log.info(
                    "%s %s: every read answered again after %.1fs",
                    self.name,
                    device.name,
                    (status.since_ns - since) / 1e9,
                )
            return
        if result.answered:
            if status.record_partial(latency, result.rejected):
                log.warning(
                    "%s %s: degraded, some reads refused (%s); those points are BAD",
                    self.name,
                    device.name,
                    result.rejected,
                )
            return
        if status.record_error(result.rejected):
            log.warning("%s %s: refused every read (%s); its points are BAD", self.name, device.name, result.rejected)

    # ------------------------------------------------------------------ COV

    async def _cov_loop(self, link: Link, device: _Device, stopping: asyncio.Event) -> None:
        """Subscribe every object of the device, renew at half the lifetime, and subscribe again at once when the
        safety net or an outage says so. Objects the device refuses COV for are polled as usual (logged once); a
        device that does not answer is retried within ``backoff_max`` while its points are polled."""
        cov = device.config.cov
        assert cov is not None
        lifetime = round(cov.lifetime)
        failing = False
        while not stopping.is_set():
            wait = lifetime / 2
            if device.address is None or device.budget is None or not device.breaker.allows(self._clock()):
                wait = min(wait, 0.5)  # not found or not answering yet: the poll loop does that work
            else:
                try:
                    await self._subscribe_all(link, device, confirmed=cov.confirmed, lifetime=lifetime)
                    if not device.cov_points:
                        return  # every object refused: the device is polled as if COV were not configured
                except DeviceError as exc:
                    failing = self._cov_failed(device, exc, failing)
                    wait = min(wait, self._network.backoff_max)
                else:
                    if failing:
                        log.info("%s %s: COV subscriptions in place again", self.name, device.name)
                    failing = False
            device.cov_resubscribe.clear()
            waiters = [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(device.cov_resubscribe.wait())]
            try:
                await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
        if device.cov_active and device.address is not None:
            # leave nothing subscribed behind a stopped gateway (the lifetime would end it anyway)
            with contextlib.suppress(DeviceError, TimeoutError):
                async with asyncio.timeout(self._network.timeout * 2):
                    for obj in device.cov_points:
                        await link.unsubscribe_cov(device.address, obj, device.cov_ids[obj])
            device.cov_active = False

    async def _subscribe_all(self, link: Link, device: _Device, *, confirmed: bool, lifetime: int) -> None:
        """Subscribe (or renew) each object. An object the device refuses COV for (many devices support it on some
        object types only) is dropped from COV for the session and polled; a silence raises (all are retried)."""
        assert device.address is not None
        for obj, pid in list(device.cov_ids.items()):
            if obj not in device.cov_points:
                continue
            try:
                async with device.lock:
                    await link.subscribe_cov(device.address, obj, pid, confirmed=confirmed, lifetime=lifetime)
            except BacnetRefused as exc:
                del device.cov_points[obj]
                refused = device.status.info.get("cov_refused")
                device.status.info["cov_refused"] = f"{refused}, {obj}" if refused else str(obj)
                log.warning(
                    "%s %s: refuses COV for %s (%s); that object is polled", self.name, device.name, obj, exc.reason
                )
                continue
            if obj.type in ANALOG_TYPES and obj not in device.cov_increment:
                try:
                    async with device.lock:
                        increment = await link.read_property(device.address, obj, "cov-increment")
                    device.cov_increment[obj] = float(increment) if isinstance(increment, int | float) else 0.0
                except BacnetRefused:
                    device.cov_increment[obj] = 0.0  # not readable: any difference counts
        if not device.cov_points:
            device.status.info["cov"] = "refused for every object: polled"
            return
        if not device.cov_active:
            device.verify_at = self._clock() + (device.config.cov.verify if device.config.cov else 0.0)
            device.plans.clear()  # the plan without the points under COV changes with the objects subscribed
        device.cov_active = True
        renewals = device.status.info.get("cov_renewals") or 0
        device.status.info["cov_renewals"] = int(renewals) + 1
        device.status.info["cov"] = f"{len(device.cov_points)} objects subscribed"

    def _cov_failed(self, device: _Device, exc: DeviceError, failing: bool) -> bool:
        device.cov_active = False
        device.status.count_failure("cov_subscribe")
        device.status.info["cov"] = f"not subscribed ({exc}); polled"
        if not failing:
            log.warning(
                "%s %s: COV subscription failed (%s); polling its points until it is back", self.name, device.name, exc
            )
        return True

    async def _cov_dispatch(self, link: Link, publish: BatchSink, stopping: asyncio.Event) -> None:
        """Turn notifications into samples: one batch per burst of notifications (a notification's present-value
        and status-flags arrive together)."""
        queue = link.notifications
        while not stopping.is_set():
            getter = asyncio.ensure_future(queue.get())
            stopper = asyncio.ensure_future(stopping.wait())
            try:
                await asyncio.wait([getter, stopper], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if not getter.done():
                    getter.cancel()
            if not getter.done() or getter.cancelled():
                return
            notices = [getter.result()]
            while not queue.empty():
                notices.append(queue.get_nowait())
            samples = self._cov_samples(notices)
            if samples:
                await publish(samples)

    def _cov_samples(self, notices: list[CovNotice]) -> list[Sample]:
        ts = time.time_ns()
        flags: dict[tuple[int, ObjectId], tuple[bool, ...]] = {}
        for notice in notices:
            if notice.property == "status-flags" and isinstance(notice.value, tuple):
                flags[(notice.process_id, notice.object)] = notice.value
        samples: list[Sample] = []
        for notice in notices:
            device = self._cov_by_id.get(notice.process_id)
            if device is None or notice.property != "present-value" or notice.object not in device.cov_points:
                continue  # not ours (a stale subscription of an earlier run): dropped
            count = device.status.info.get("cov_notifications") or 0
            device.status.info["cov_notifications"] = int(count) + 1
            object_flags = flags.get((notice.process_id, notice.object))
            for point in device.cov_points[notice.object]:
                try:
                    value = _checked(notice.value, point.kind)
                except ValueError:
                    device.status.count_failure("unexpected_value")
                    samples.append(Sample(point.point, None, ts, Quality.BAD))
                    continue
                device.cov_last[point.point] = value
                faulty = object_flags is not None and (object_flags[1] or (len(object_flags) > 3 and object_flags[3]))
                samples.append(Sample(point.point, value, ts, Quality.UNCERTAIN if faulty else Quality.GOOD))
        return samples

    def _check_cov(self, device: _Device, samples: list[Sample]) -> None:
        """The safety net: a polled value a notification should have brought means the subscription is silent."""
        silent: list[str] = []
        by_point = {p.point: p for points in device.cov_points.values() for p in points}
        for sample in samples:
            planned = by_point.get(sample.point)
            if planned is None or sample.value is None:
                continue
            last = device.cov_last.get(sample.point)
            if last is None:
                silent.append(f"{sample.point}: no notification yet")
            elif isinstance(sample.value, float) and isinstance(last, float):
                if abs(sample.value - last) > device.cov_increment.get(planned.object, 0.0):
                    silent.append(f"{sample.point}: {last} notified, {sample.value} polled")
            elif sample.value != last:
                silent.append(f"{sample.point}: {last} notified, {sample.value} polled")
        if silent:
            device.status.count_failure("cov_silent")
            log.warning(
                "%s %s: COV subscription silent (%s); subscribing again", self.name, device.name, "; ".join(silent[:3])
            )
            device.cov_resubscribe.set()

    # ------------------------------------------------------------------ writes

    async def write(self, command: Command) -> None:
        """Write one value at the command's priority (else the point's profile priority), or relinquish that slot
        (``command.relinquish``). Raises WriteRejected (never sent), DeviceUnavailable (not running, no address, no
        answer) or DeviceRejected (the device refused: the reason is in the message; not retried)."""
        target = self._points.get(command.point)
        if target is None:
            raise WriteRejected(f"{command.point} is not a point of {self.name}")
        device, spec = target
        if not spec.writable:
            raise WriteRejected(f"{command.point} is not writable (profile {device.config.profile})")
        priority = spec.priority if command.priority is None else command.priority
        if not 1 <= priority <= 16 or priority in RESERVED_PRIORITIES:
            # the allowlist and the profile refuse these at load; a command built elsewhere must not slip through
            raise WriteRejected(
                f"{command.point}: priority {priority} is not one a gateway may write (9-16, 3-5, 7, 8)"
            )
        value = command.value
        wire: Scalar
        if command.relinquish:
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
        await self._send_write(device, spec, command.point, wire, priority)

    async def relinquish(self, point: str, origin: str = "cli", priority: int | None = None) -> None:
        """Write NULL at ``priority`` (default the point's profile priority): the device falls back to lower
        priorities or its relinquish-default."""
        await self.write(Command(point, None, origin, priority=priority, relinquish=True))

    async def _send_write(self, device: _Device, spec: BacnetPoint, point: str, value: Scalar, priority: int) -> None:
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
                await link.write_property(device.address, spec.object, spec.property, value, priority)
        except TimeoutError:
            raise DeviceUnavailable(f"{what} to {point} not done within {self._write_timeout:g}s") from None
        except BacnetRefused as exc:
            # a refusal (write-access-denied, value-out-of-range, ...) is the device's answer: never retried
            log.warning("%s: %s to %s at priority %d refused: %s", self.name, what, point, priority, exc)
            raise DeviceRejected(
                f"{point}: the device refused the {what} at priority {priority} ({exc.kind} {exc.reason})"
            ) from exc
        except DeviceError:
            raise
        log.info("%s: %s to %s (%s at priority %d)", self.name, what, point, spec.object, priority)


def _failure_key(exc: BacnetRefused) -> str:
    """``failures`` key of a refusal: ``reject_unrecognized_service``, ``error_object_unknown_object``, or
    ``malformed_answer`` (whatever the detail: the detail is in ``last_error``)."""
    if exc.kind == "malformed":
        return "malformed_answer"
    return f"{exc.kind}_{exc.reason}".replace("-", "_").replace(" ", "_")


def _bad(points: Sequence[PlannedPoint], ts: int) -> list[Sample]:
    return [Sample(p.point, None, ts, Quality.BAD) for p in points]


def network_devices(site: Site) -> list[Section[BacnetNetworkConfig, BacnetDeviceConfig, BacnetProfile]]:
    """Each BACnet network of the site with its devices and their profiles, in the order of the site file."""
    return site_sections(
        site,
        "bacnet_networks",
        section=BacnetNetworkConfig,
        device=BacnetDeviceConfig,
        profile=BacnetProfile,
        belongs=lambda network, device: device.network == network.id,
    )


def build_sources(site: Site) -> list[BacnetNetworkSource]:
    """One source per BACnet network that has devices, in the order of the site file."""
    return [BacnetNetworkSource(network, devices) for network, devices in network_devices(site) if devices]
