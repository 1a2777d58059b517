"""The one place bacpypes3 is used: ``BacnetLink``, the gateway's BACnet/IP port, and the translation of bacpypes3's
answers and failures into plain values and gateway errors.

Exception tree at this boundary (bacpypes3 signals a device's refusal by *raising* the Error/Reject/Abort APDU,
which derives from ``BaseException``, so a bare ``except Exception`` would let it through)::

    DeviceError
     ├── DeviceUnavailable          no answer after the APDU retries (Abort no-response), or the port is closed
     └── DeviceRejected             the device answered with an Error, Reject or Abort
          └── BacnetRefused         .kind ("error" | "reject" | "abort") and .reason ("unknown-object",
                                    "unrecognized-service", "segmentation-not-supported", ...)

An answer bacpypes3 cannot decode or that is not the acknowledgement asked for is a ``BacnetRefused`` with kind
``malformed``: its points go BAD and the device is not retried blindly.

Values come back as Python scalars: Real/Double -> float, Unsigned/Integer/Enumerated -> int, Boolean and BinaryPV
-> bool, CharacterString -> str, ObjectIdentifier -> "type,instance", Null -> None,
StatusFlags -> a tuple of four bools (in-alarm, fault, overridden, out-of-service). A per-property error inside
a ReadPropertyMultiple answer is a ``PropertyError`` value.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from drivers.bacnet.config import BacnetNetworkConfig, ObjectId
from gateway.errors import DeviceRejected, DeviceUnavailable

log = logging.getLogger("drivers.bacnet")

Scalar = float | int | bool | str | None


class BacnetRefused(DeviceRejected):
    """The device answered, and said no (or said something that is not an answer)."""

    def __init__(self, kind: str, reason: str, what: str) -> None:
        super().__init__(f"{what}: {kind} {reason}")
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PropertyError:
    """One property of a ReadPropertyMultiple answer that the device could not read."""

    error_class: str
    error_code: str

    def __str__(self) -> str:
        return f"{self.error_class} {self.error_code}"


@dataclass(frozen=True, slots=True)
class IAm:
    """A device's I-Am: who it is, where, and what it can take."""

    instance: int
    address: str
    max_apdu: int
    segmentation: str
    vendor: int


@dataclass(frozen=True, slots=True)
class CovNotice:
    """One property of a COV notification: which device (address), subscription, object, and the value."""

    address: str
    process_id: int
    object: ObjectId
    property: str
    value: Scalar | tuple[bool, ...]


class _CovContext:
    """Stands where bacpypes3 expects its SubscriptionContextManager (``app._cov_contexts``), so notifications reach
    us; the subscription's *renewal* is the source's, not bacpypes3's: bacpypes3 renews in a fire-and-forget task
    whose failure nobody sees, which is exactly how subscriptions lapse silently."""

    def __init__(self, link: BacnetLink, address: str, process_id: int, obj: ObjectId, objid: Any) -> None:
        self._link = link
        self._address = address
        self._process_id = process_id
        self._object = obj
        self.monitored_object_identifier = objid

    async def put(self, property_value: Any) -> None:
        from bacpypes3.vendor import get_vendor_info

        prop = str(property_value.propertyIdentifier)
        try:
            cls = get_vendor_info(0).get_object_class(self.monitored_object_identifier[0])
            kind = cls.get_property_type(property_value.propertyIdentifier) if cls else None
            if kind is None:
                raise ValueError(f"no type for {prop}")
            value = to_python(property_value.value.cast_out(kind))
        except (ValueError, TypeError, AttributeError, IndexError) as exc:
            self._link.malformed_notifications += 1
            log.debug("COV notification from %s for %s %s not decoded: %s", self._address, self._object, prop, exc)
            return
        self._link.notifications.put_nowait(CovNotice(self._address, self._process_id, self._object, prop, value))


#: one property to read: (property name, array index or None)
PropertyRef = tuple[str, int | None]
#: one answered property: (object, property, index, value or PropertyError)
ReadResult = tuple[ObjectId, str, int | None, Scalar | tuple[bool, ...] | PropertyError]


def to_python(value: Any) -> Scalar | tuple[bool, ...]:
    """A bacpypes3 value as a plain Python value; raises ValueError for anything else (a constructed value)."""
    from bacpypes3.basetypes import BinaryPV, StatusFlags
    from bacpypes3.primitivedata import Boolean, CharacterString, Enumerated, Null, ObjectIdentifier, Real

    if value is None or isinstance(value, Null):
        return None
    if isinstance(value, BinaryPV):
        return str(value) == "active"
    if isinstance(value, Boolean):
        return bool(value)
    if isinstance(value, StatusFlags):
        bits = list(value)
        return tuple(bool(bits[i]) if i < len(bits) else False for i in range(4))
    if isinstance(value, Enumerated):
        return int(value)
    if isinstance(value, Real):
        return float(value)
    if isinstance(value, CharacterString):
        return str(value)
    if isinstance(value, ObjectIdentifier):  # an element of an object list, as "type,instance"
        return f"{value[0]},{int(value[1])}"
    if isinstance(value, int):
        return int(value)
    raise ValueError(f"unexpected value of type {type(value).__name__}")


def _refusal(exc: BaseException, what: str) -> DeviceRejected | DeviceUnavailable:
    """Translate a raised bacpypes3 Error/Reject/Abort APDU into a gateway error."""
    from bacpypes3.apdu import AbortPDU, ErrorPDU, RejectPDU

    if isinstance(exc, AbortPDU):
        reason = str(exc.apduAbortRejectReason)
        if reason == "no-response":
            return DeviceUnavailable(f"{what}: no answer")
        return BacnetRefused("abort", reason, what)
    if isinstance(exc, RejectPDU):
        return BacnetRefused("reject", str(exc.apduAbortRejectReason), what)
    if isinstance(exc, ErrorPDU):
        return BacnetRefused("error", f"{getattr(exc, 'errorClass', '?')} {getattr(exc, 'errorCode', '?')}", what)
    return BacnetRefused("malformed", f"{type(exc).__name__}: {exc}", what)


class BacnetLink:
    """The gateway's BACnet/IP port (one bacpypes3 application): ``async with BacnetLink(network) as link:``.

    Every call takes the peer's address (``a.b.c.d[:port]``). Calls to different devices may run at once; the
    caller keeps one request in flight per device.
    """

    def __init__(self, network: BacnetNetworkConfig, *, instance: int = 4194300) -> None:
        self._network = network
        self._instance = instance
        self._app: Any = None
        #: COV notifications of every subscription made through this link, in arrival order
        self.notifications: asyncio.Queue[CovNotice] = asyncio.Queue()
        #: notifications that could not be decoded (counted, dropped)
        self.malformed_notifications = 0

    @property
    def connected(self) -> bool:
        return self._app is not None

    @property
    def foreign_registration(self) -> str | None:
        """The BBMD registration of a foreign-device port (None for a normal port): ``registered``, ``pending``,
        ``unregistered`` or ``refused (code N)``. bacpypes3 renews it before its TTL runs out."""
        if self._app is None or self._network.foreign is None:
            return None
        code = int(getattr(self._app.foreign, "bbmdRegistrationStatus", -2))
        return {-2: "unregistered", -1: "pending", 0: "registered"}.get(code, f"refused (code {code})")

    async def __aenter__(self) -> Self:
        from bacpypes3.ipv4.app import ForeignApplication, NormalApplication
        from bacpypes3.local.device import DeviceObject
        from bacpypes3.pdu import Address, IPv4Address

        net = self._network
        device = DeviceObject(
            objectIdentifier=("device", self._instance),
            objectName=f"edge-gateway-{net.id}",
            vendorIdentifier=999,
            # the APDU timeout and retries of *our* requests come from our own device object (bacpypes3 appservice)
            apduTimeout=round(net.timeout * 1000),
            numberOfApduRetries=net.retries,
            maxApduLengthAccepted=1476,
            segmentationSupported="segmented-both",
        )
        try:
            local = IPv4Address(net.bind)
            if net.foreign is not None:
                app = ForeignApplication(device, local)
                app.register(Address(net.foreign.bbmd), round(net.foreign.ttl))
            else:
                app = NormalApplication(device, local)
        except (OSError, ValueError) as exc:
            raise DeviceUnavailable(f"bacnet[{net.id}]: cannot open {net.bind}: {exc}") from exc
        # bacpypes3 binds the UDP socket in a task and retries for ever on OSError: wait a bounded time for it, so
        # an address this host does not have fails here with a clear message instead of polling into the void
        server = app.server if net.foreign is not None else app.normal.server
        tasks = list(getattr(server, "_transport_tasks", ()))
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=5.0)
            if pending:
                app.close()
                for task in pending:
                    task.cancel()
                raise DeviceUnavailable(f"bacnet[{net.id}]: cannot bind {net.bind} (is the address on this host?)")
        self._app = app
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        app, self._app = self._app, None
        if app is not None:
            app.close()

    def _application(self) -> Any:
        if self._app is None:
            raise DeviceUnavailable(f"bacnet[{self._network.id}] is not open")
        return self._app

    async def read_property(self, address: str, obj: ObjectId, prop: str, index: int | None = None) -> Scalar:
        from bacpypes3.apdu import ErrorRejectAbortNack
        from bacpypes3.pdu import Address
        from bacpypes3.primitivedata import ObjectIdentifier, PropertyIdentifier

        app = self._application()
        what = f"{address} read {obj} {prop}"
        try:
            value = await app.read_property(
                Address(address), ObjectIdentifier(str(obj)), PropertyIdentifier(prop), index
            )
        except ErrorRejectAbortNack as exc:
            raise _refusal(exc, what) from None
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            raise BacnetRefused("malformed", f"{type(exc).__name__}: {exc}", what) from exc
        if isinstance(value, ErrorRejectAbortNack):  # bacpypes3 returns some refusals instead of raising them
            raise _refusal(value, what)
        if value is None or (isinstance(value, str) and value.startswith("-no ")):
            raise BacnetRefused("malformed", "not a ReadProperty acknowledgement", what)
        try:
            result = to_python(value)
        except ValueError as exc:
            raise BacnetRefused("malformed", str(exc), what) from None
        if isinstance(result, tuple):
            raise BacnetRefused("malformed", "a bit string where a scalar was expected", what)
        return result

    async def read_status_flags(self, address: str, obj: ObjectId) -> tuple[bool, ...]:
        from bacpypes3.apdu import ErrorRejectAbortNack
        from bacpypes3.pdu import Address
        from bacpypes3.primitivedata import ObjectIdentifier, PropertyIdentifier

        what = f"{address} read {obj} status-flags"
        try:
            value = await self._application().read_property(
                Address(address), ObjectIdentifier(str(obj)), PropertyIdentifier("status-flags")
            )
        except ErrorRejectAbortNack as exc:
            raise _refusal(exc, what) from None
        result = to_python(value)
        if not isinstance(result, tuple):
            raise BacnetRefused("malformed", "status-flags is not a bit string", what)
        return result

    async def read_multiple(self, address: str, request: list[tuple[ObjectId, list[PropertyRef]]]) -> list[ReadResult]:
        """One ReadPropertyMultiple; per-property errors come back as ``PropertyError`` values."""
        from bacpypes3.apdu import ErrorRejectAbortNack
        from bacpypes3.basetypes import ErrorType, PropertyReference
        from bacpypes3.pdu import Address
        from bacpypes3.primitivedata import ObjectIdentifier, PropertyIdentifier

        app = self._application()
        what = f"{address} ReadPropertyMultiple ({sum(len(p) for _, p in request)} properties)"
        parameters: list[Any] = []
        for obj, props in request:
            parameters.append(ObjectIdentifier(str(obj)))
            refs = []
            for prop, index in props:
                ref = PropertyReference(propertyIdentifier=PropertyIdentifier(prop))
                if index is not None:
                    ref.propertyArrayIndex = index
                refs.append(ref)
            parameters.append(refs)
        try:
            answer = await app.read_property_multiple(Address(address), parameters)
        except ErrorRejectAbortNack as exc:
            raise _refusal(exc, what) from None
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            raise BacnetRefused("malformed", f"{type(exc).__name__}: {exc}", what) from exc
        if isinstance(answer, ErrorRejectAbortNack):
            raise _refusal(answer, what)
        if not isinstance(answer, list):
            raise BacnetRefused("malformed", "not a ReadPropertyMultiple acknowledgement", what)
        results: list[ReadResult] = []
        for objid, prop, index, value in answer:
            obj = ObjectId(str(objid[0]), int(objid[1]))
            if isinstance(value, ErrorType):
                results.append((obj, str(prop), index, PropertyError(str(value.errorClass), str(value.errorCode))))
                continue
            converted: Scalar | tuple[bool, ...] | PropertyError
            try:
                converted = to_python(value)
            except ValueError as exc:
                converted = PropertyError("malformed", str(exc))
            results.append((obj, str(prop), index, converted))
        return results

    async def write_property(self, address: str, obj: ObjectId, prop: str, value: Scalar, priority: int | None) -> None:
        """WriteProperty; ``value=None`` writes NULL (relinquishes ``priority``)."""
        from bacpypes3.apdu import ErrorRejectAbortNack
        from bacpypes3.basetypes import BinaryPV
        from bacpypes3.pdu import Address
        from bacpypes3.primitivedata import Null, ObjectIdentifier, PropertyIdentifier

        app = self._application()
        what = f"{address} write {obj} {prop}"
        wire: Any
        if value is None:
            wire = Null(())
        elif isinstance(value, bool) and obj.type.startswith("binary-"):
            wire = BinaryPV("active" if value else "inactive")
        else:
            wire = value
        try:
            answer = await app.write_property(
                Address(address), ObjectIdentifier(str(obj)), PropertyIdentifier(prop), wire, None, priority
            )
        except ErrorRejectAbortNack as exc:
            raise _refusal(exc, what) from None
        except (ValueError, TypeError) as exc:
            raise BacnetRefused("malformed", f"{type(exc).__name__}: {exc}", what) from exc
        if isinstance(answer, ErrorRejectAbortNack):
            raise _refusal(answer, what)
        if answer is not None:
            raise BacnetRefused("malformed", f"unexpected answer {answer!r}", what)

    async def who_is(
        self, low: int | None = None, high: int | None = None, address: str | None = None, seconds: float = 3.0
    ) -> list[IAm]:
        """Who-Is (to ``address``, or broadcast) and the I-Ams that came back within ``seconds``."""
        from bacpypes3.pdu import Address

        app = self._application()
        target = Address(address) if address else None
        answers = await app.who_is(low, high, target, timeout=seconds)
        found: list[IAm] = []
        for i_am in answers or ():
            ident = i_am.iAmDeviceIdentifier
            found.append(
                IAm(
                    instance=int(ident[1]),
                    address=str(i_am.pduSource),
                    max_apdu=int(i_am.maxAPDULengthAccepted),
                    segmentation=str(i_am.segmentationSupported),
                    vendor=int(i_am.vendorID),
                )
            )
        return found

    async def subscribe_cov(
        self, address: str, obj: ObjectId, process_id: int, *, confirmed: bool, lifetime: int
    ) -> None:
        """SubscribeCOV (a new subscription or the renewal of one); notifications go to ``notifications``."""
        from bacpypes3.apdu import ErrorRejectAbortNack, SubscribeCOVRequest
        from bacpypes3.pdu import Address
        from bacpypes3.primitivedata import ObjectIdentifier

        app = self._application()
        what = f"{address} SubscribeCOV {obj}"
        peer = Address(address)
        objid = ObjectIdentifier(str(obj))
        key = (peer, process_id)
        if key not in app._cov_contexts:
            app._cov_contexts[key] = _CovContext(self, address, process_id, obj, objid)
        request = SubscribeCOVRequest(
            subscriberProcessIdentifier=process_id,
            monitoredObjectIdentifier=objid,
            issueConfirmedNotifications=confirmed,
            lifetime=lifetime,
            destination=peer,
        )
        try:
            answer = await app.request(request)
        except ErrorRejectAbortNack as exc:
            raise _refusal(exc, what) from None
        if isinstance(answer, ErrorRejectAbortNack):
            raise _refusal(answer, what)

    async def unsubscribe_cov(self, address: str, obj: ObjectId, process_id: int) -> None:
        """Cancel a subscription (best effort: the device also drops it when its lifetime ends)."""
        from bacpypes3.apdu import ErrorRejectAbortNack, SubscribeCOVRequest
        from bacpypes3.pdu import Address
        from bacpypes3.primitivedata import ObjectIdentifier

        app = self._application()
        peer = Address(address)
        app._cov_contexts.pop((peer, process_id), None)
        request = SubscribeCOVRequest(
            subscriberProcessIdentifier=process_id,
            monitoredObjectIdentifier=ObjectIdentifier(str(obj)),
            destination=peer,
        )
        try:
            await app.request(request)
        except ErrorRejectAbortNack as exc:
            raise _refusal(exc, f"{address} cancel SubscribeCOV {obj}") from None
