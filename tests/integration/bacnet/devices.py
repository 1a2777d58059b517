"""Real BACnet/IP devices for tests: bacpypes3 applications on their own loopback UDP ports, in-process.

``start_device(instance, objects, ...)`` binds a bacpypes3 ``NormalApplication`` to ``127.0.0.1:<free port>`` with a
device object and the given analog/binary/multi-state objects; the driver under test talks to it over real UDP.
Kinds of device a test can ask for: ``rpm=False`` (rejects ReadPropertyMultiple with unrecognized-service, as old
controllers do), ``rpm_simple_ack=True`` (answers it with an unexpected SimpleACK), ``max_apdu``/``segmentation``
(a small controller), and ``GarbageDevice`` (a UDP port that answers
every request with bytes that are not BACnet).

Discovery needs no broadcast: a Who-Is can be sent to a device's own address (unicast), which is what these tests
and ``bacnet discover --address`` do.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Device:
    instance: int
    port: int
    app: Any
    objects: dict[str, Any] = field(default_factory=dict)
    #: services the device was asked for, by name (ReadPropertyMultipleRequest, ReadPropertyRequest, ...)
    requests: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.app.close()


def _object(kind: str, instance: int, value: Any, **extra: Any) -> Any:
    from bacpypes3.local.analog import AnalogInputObject, AnalogValueObjectCmd
    from bacpypes3.local.binary import BinaryInputObject, BinaryValueObjectCmd
    from bacpypes3.local.multistate import MultiStateValueObject

    name = f"{kind}-{instance}"
    common: dict[str, Any] = {
        "objectIdentifier": (kind, instance),
        "objectName": name,
        "presentValue": value,
        "outOfService": False,
    }
    common.update(extra)
    if kind == "analog-input":
        return AnalogInputObject(units="degrees-celsius", **common)
    if kind == "analog-value":
        return AnalogValueObjectCmd(units="percent", relinquishDefault=value, **common)
    if kind == "binary-input":
        return BinaryInputObject(**common)
    if kind == "binary-value":
        return BinaryValueObjectCmd(relinquishDefault=value, **common)
    if kind == "multi-state-value":
        return MultiStateValueObject(numberOfStates=4, **common)
    raise ValueError(kind)


async def start_device(
    instance: int,
    objects: dict[str, Any],
    *,
    rpm: bool = True,
    rpm_simple_ack: bool = False,
    max_apdu: int = 1476,
    segmentation: str = "segmented-both",
    port: int | None = None,
) -> Device:
    """Start one device; ``objects`` maps ``"analog-input,1"`` to its present value (or a dict of properties)."""
    from bacpypes3.errors import UnrecognizedService
    from bacpypes3.ipv4.app import NormalApplication
    from bacpypes3.local.device import DeviceObject
    from bacpypes3.pdu import IPv4Address

    port = port or free_udp_port()
    seen: dict[str, int] = {}

    class TestApplication(NormalApplication):  # type: ignore[misc]
        async def indication(self, apdu: Any) -> None:
            name = type(apdu).__name__
            seen[name] = seen.get(name, 0) + 1
            await super().indication(apdu)

        if not rpm:

            async def do_ReadPropertyMultipleRequest(self, apdu: Any) -> None:
                raise UnrecognizedService("no ReadPropertyMultiple here")

        elif rpm_simple_ack:

            async def do_ReadPropertyMultipleRequest(self, apdu: Any) -> None:
                # a broken firmware: acknowledges the read with a SimpleACK, which carries no values
                from bacpypes3.apdu import SimpleAckPDU

                await self.response(SimpleAckPDU(context=apdu))

    device_object = DeviceObject(
        objectIdentifier=("device", instance),
        objectName=f"test-device-{instance}",
        vendorIdentifier=999,
        maxApduLengthAccepted=max_apdu,
        segmentationSupported=segmentation,
    )
    app = TestApplication(device_object, IPv4Address(f"127.0.0.1:{port}"))
    await asyncio.wait(list(app.normal.server._transport_tasks), timeout=5)
    device = Device(instance, port, app, requests=seen)
    for ident, spec in objects.items():
        kind, _, number = ident.partition(",")
        extra = spec if isinstance(spec, dict) else {"presentValue": spec}
        value = extra.pop("presentValue")
        obj = _object(kind, int(number), value, **extra)
        app.add_object(obj)
        device.objects[ident] = obj
    return device


class GarbageDevice(asyncio.DatagramProtocol):
    """A UDP port that answers every datagram with bytes that are no BACnet (a misconfigured or hostile peer)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        assert self.transport is not None
        # a BVLL header claiming an original-unicast NPDU, then an NPDU and APDU that are truncated nonsense
        self.transport.sendto(b"\x81\x0a\x00\x09\x01\x00\x30\xff\xff", addr)
        self.transport.sendto(b"not bacnet at all", addr)


async def start_garbage(port: int | None = None) -> tuple[GarbageDevice, asyncio.DatagramTransport, int]:
    port = port or free_udp_port()
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(GarbageDevice, local_addr=("127.0.0.1", port))
    return protocol, transport, port
