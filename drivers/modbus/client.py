"""The one place pymodbus is imported: a Modbus link (TCP or RTU) as an async context manager.

Owns ``ModbusLink`` and the translation of pymodbus's two failure channels into the gateway's exception tree::

    pymodbus exception (ModbusIOException, ConnectionException, ...), OSError, timeout
        -> DeviceUnavailable         (no answer: retry later; ``link.connected`` says whether the link itself died)
    response.isError() with exception code 10/11 (gateway path unavailable / target did not respond)
        -> DeviceUnavailable         (a TCP-to-RTU gateway telling us its slave is silent: that is a timeout)
    response.isError() with any other exception code
        -> DeviceRejected(code=...)  (the device answered and refused: illegal address, busy, ...)

Nothing above this module sees a pymodbus type. It does not retry, schedule or log outages: the bus scheduler
(``drivers.modbus.source``) owns retries, breakers and reconnects, so there is one policy for all of them.

Register reads (function codes 3 and 4) are answered with the response's bytes as they came off the wire
(``read_register_bytes``): the poll path unpacks a whole block with one ``struct`` anyway, so this module
registers, through pymodbus's ``register`` hook, response classes that keep the register bytes instead of
building a list with one ``struct.unpack`` per register (and a debug string of it that pymodbus formats even
when debug logging is off).

Modbus TCP runs on ``_TcpSession``: pymodbus's request builders (``ModbusClientMixin``, the interface pymodbus
documents for custom clients), its socket framer (MBAP header, transaction and unit id checks) and its PDU
decoders, carried by a plain asyncio Protocol with one request in flight and its timeout on ``loop.call_later``.
It replaces pymodbus's transaction manager and transport for TCP only, which cost about as much CPU per request
as everything else the gateway does for the 50 points a read carries (measured in ``bench/RESULTS.md``): a
lock, ``asyncio.wait_for``, retry and reconnect machinery, and frame logging, none of which we use since the
scheduler owns retries and reconnects. Like pymodbus's client, the session drops the connection after
``_SILENT_LIMIT`` requests in a row got no answer at all, so a dead TCP path is re-opened rather than waited
on. Serial (RTU) stays on pymodbus's own client: there the line, not the CPU, is the limit, and its RTU timing
and echo handling are worth more than the CPU they cost.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable
from types import TracebackType
from typing import Any, Self, cast

from pymodbus.client import AsyncModbusSerialClient
from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse, ReadInputRegistersResponse

from drivers.modbus.config import ModbusBusConfig
from gateway.errors import DeviceRejected, DeviceUnavailable

# pymodbus logs every failed request at ERROR; the scheduler logs once per outage and once per recovery instead.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

#: exception codes a gateway sends on behalf of a silent slave (Modbus application protocol v1.1b3, §7)
_GATEWAY_SILENCE = frozenset({10, 11})
_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


def exception_name(code: int) -> str:
    return _EXCEPTION_NAMES.get(code, "unknown exception")


class _RegisterBytesMixin:
    """A register-read response that keeps its data as wire bytes (``raw``); ``registers`` stays empty."""

    function_code: int
    dev_id: int
    raw: bytes = b""

    def decode(self, data: bytes) -> None:
        byte_count = data[0]
        # the same check pymodbus makes: a byte count beyond the frame is a broken answer, not a short one
        if byte_count >= len(data):
            raise ModbusIOException(
                f"byte_count {byte_count} > length of packet {len(data)}", function_code=self.function_code
            )
        self.raw = data[1 : 1 + byte_count]

    def __str__(self) -> str:
        return f"{type(self).__name__}(dev_id={self.dev_id}, {len(self.raw)} bytes)"


class _HoldingBytesResponse(_RegisterBytesMixin, ReadHoldingRegistersResponse):
    pass


class _InputBytesResponse(_RegisterBytesMixin, ReadInputRegistersResponse):
    pass


#: requests in a row with no answer after which a TCP connection is dropped and re-opened (pymodbus: retries + 3)
_SILENT_LIMIT = 4
#: transaction ids run 1..65000 and wrap, as pymodbus's do
_MAX_TID = 65000


class _TcpSession(asyncio.Protocol, ModbusClientMixin[Awaitable[ModbusPDU]]):
    """One Modbus TCP connection: pymodbus builds, frames and decodes; this class only moves bytes and times out.

    ``await session.read_holding_registers(...)`` (any ``ModbusClientMixin`` method) sends one request and waits
    for the frame with its transaction and unit id. Raises ``TimeoutError`` when none comes within ``timeout``,
    ``ConnectionException`` when the connection is (or gets) closed, ``ModbusIOException`` for an undecodable
    answer. Requests must not overlap: the bus scheduler keeps one in flight.
    """

    def __init__(self, timeout: float) -> None:
        decoder = DecodePDU(False)
        decoder.register(_HoldingBytesResponse)
        decoder.register(_InputBytesResponse)
        self._framer = FramerSocket(decoder)
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._waiter: asyncio.Future[ModbusPDU] | None = None
        self._expect_unit = 0
        self._expect_tid = 0
        self._tid = 0
        self._silent = 0

    @property
    def connected(self) -> bool:
        return self._transport is not None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream connection's transport (uvloop's is not an asyncio.Transport subclass, hence no isinstance)
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionException(f"connection lost: {exc or 'closed by the peer'}"))

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self._buffer = b""  # a late answer to a request that timed out: nobody waits for it
            return
        buffer = self._buffer + data if self._buffer else data
        try:
            # skips frames of other transaction ids (late answers), keeps a partial frame for the next chunk
            used, pdu = self._framer.handleFrame(buffer, self._expect_unit, self._expect_tid)
        except ModbusException as exc:
            self._buffer = b""
            waiter.set_exception(exc)
            return
        self._buffer = buffer[used:]
        if pdu is not None:
            waiter.set_result(pdu)

    # ModbusClientMixin: every read_*/write_* method builds its request PDU and calls this

    def execute(self, no_response_expected: bool, request: ModbusPDU) -> Awaitable[ModbusPDU]:
        if no_response_expected:
            raise ValueError("every request of the gateway waits for its answer")
        return self._exchange(request)

    async def _exchange(self, request: ModbusPDU) -> ModbusPDU:
        transport = self._transport
        if transport is None:
            raise ConnectionException("not connected")
        if self._waiter is not None:
            # answers are matched to the one pending request: a second one would steal or lose its answer
            raise RuntimeError("one Modbus request at a time on a connection (the bus scheduler serialises them)")
        self._tid = self._tid + 1 if self._tid < _MAX_TID else 1
        request.transaction_id = self._expect_tid = self._tid
        self._expect_unit = request.dev_id
        self._buffer = b""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        transport.write(self._framer.buildFrame(request))
        timer = loop.call_later(self._timeout, _expire, waiter)
        try:
            response: ModbusPDU = await waiter
        except TimeoutError:
            self._silent += 1
            if self._silent >= _SILENT_LIMIT:
                self.close()  # nothing answers on this connection: let the scheduler re-open it
            raise
        finally:
            timer.cancel()
            self._waiter = None
        self._silent = 0
        return response


def _expire(waiter: asyncio.Future[ModbusPDU]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no answer within the timeout"))


class ModbusLink:
    """One connection to a bus. ``async with ModbusLink(bus) as link:`` connects; leaving the block closes it.

    Requests must not overlap (the scheduler keeps one in flight). ``timeout`` bounds every request.
    """

    def __init__(self, bus: ModbusBusConfig, *, timeout: float | None = None) -> None:
        self._bus = bus
        self._timeout = bus.timeout if timeout is None else timeout
        self._client: _TcpSession | AsyncModbusSerialClient | None = None

    @property
    def name(self) -> str:
        return self._bus.describe()

    @property
    def connected(self) -> bool:
        return self._client is not None and bool(self._client.connected)

    async def __aenter__(self) -> Self:
        bus = self._bus
        if bus.type == "tcp":
            await self._open_tcp()
            return self
        # pymodbus's own reconnect is off (reconnect_delay=0) and retries=0: the scheduler owns both policies.
        client = AsyncModbusSerialClient(
            bus.serial or "",
            baudrate=bus.baudrate,
            parity=bus.parity,
            stopbits=bus.stopbits,
            bytesize=bus.bytesize,
            timeout=self._timeout,
            retries=0,
            reconnect_delay=0,
        )
        client.register(_HoldingBytesResponse)
        client.register(_InputBytesResponse)
        self._client = client
        try:
            connected = await asyncio.wait_for(client.connect(), timeout=self._timeout + 1.0)
        except (ModbusException, OSError, TimeoutError) as exc:
            client.close()
            self._client = None
            raise DeviceUnavailable(f"cannot connect to {self.name}: {exc}") from exc
        if not connected:
            client.close()
            self._client = None
            raise DeviceUnavailable(f"cannot connect to {self.name}")
        return self

    async def _open_tcp(self) -> None:
        bus = self._bus
        loop = asyncio.get_running_loop()
        session = _TcpSession(self._timeout)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: session, bus.host or "", bus.port), timeout=self._timeout + 1.0
            )
        except (OSError, TimeoutError) as exc:
            session.close()
            # a TimeoutError has no text: say what timed out rather than end the line with ": "
            detail = str(exc) or f"no connection within {self._timeout + 1.0:g}s"
            raise DeviceUnavailable(f"cannot connect to {self.name}: {detail}") from exc
        self._client = session

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _require(self) -> _TcpSession | AsyncModbusSerialClient:
        if self._client is None or not self._client.connected:
            raise DeviceUnavailable(f"{self.name} is not connected")
        return self._client

    async def read_register_bytes(self, table: str, unit: int, address: int, count: int) -> bytes:
        """``count`` registers as the ``2 * count`` bytes received (big-endian registers, wire order)."""
        client = self._require()
        if table == "holding":
            call = client.read_holding_registers(address, count=count, device_id=unit)
        elif table == "input":
            call = client.read_input_registers(address, count=count, device_id=unit)
        else:
            raise ValueError(f"not a register table: {table}")
        response = await self._execute(call, unit, table, address, count)
        raw: bytes = response.raw
        size = 2 * count
        if len(raw) != size:
            if len(raw) < size:
                raise DeviceRejected(f"unit {unit} answered {len(raw) // 2} of {count} registers at {table} {address}")
            raw = raw[:size]
        return raw

    async def read_registers(self, table: str, unit: int, address: int, count: int) -> list[int]:
        raw = await self.read_register_bytes(table, unit, address, count)
        return list(struct.unpack(f">{count}H", raw))

    async def read_bits(self, table: str, unit: int, address: int, count: int) -> list[bool]:
        client = self._require()
        if table == "coil":
            call = client.read_coils(address, count=count, device_id=unit)
        elif table == "discrete":
            call = client.read_discrete_inputs(address, count=count, device_id=unit)
        else:
            raise ValueError(f"not a bit table: {table}")
        response = await self._execute(call, unit, table, address, count)
        bits: list[bool] = response.bits
        if len(bits) < count:
            raise DeviceRejected(f"unit {unit} answered {len(bits)} of {count} bits at {table} {address}")
        return bits[:count]

    async def write_registers(self, unit: int, address: int, values: list[int]) -> None:
        client = self._require()
        if len(values) == 1:
            # Function 6: some devices (many VFDs) accept only single-register writes for one register.
            call = client.write_register(address, values[0], device_id=unit)
        else:
            call = client.write_registers(address, values, device_id=unit)
        await self._execute(call, unit, "holding", address, len(values), writing=True)

    async def write_coil(self, unit: int, address: int, value: bool) -> None:
        client = self._require()
        await self._execute(client.write_coil(address, value, device_id=unit), unit, "coil", address, 1, writing=True)

    async def _execute(
        self, call: Any, unit: int, table: str, address: int, count: int, *, writing: bool = False
    ) -> Any:
        # what the request was is spelled out only on failure: formatting it for every read costs more than it says
        try:
            response = await call
        except (ModbusException, TimeoutError) as exc:
            what = _describe(table, address, count, writing)
            raise DeviceUnavailable(f"unit {unit} did not answer ({what}): {exc}") from exc
        except OSError as exc:
            what = _describe(table, address, count, writing)
            raise DeviceUnavailable(f"unit {unit} unreachable ({what}): {exc}") from exc
        if response.isError():
            what = _describe(table, address, count, writing)
            code = int(getattr(response, "exception_code", 0) or 0)
            message = f"unit {unit} refused {what}: exception {code} ({exception_name(code)})"
            if code in _GATEWAY_SILENCE:
                raise DeviceUnavailable(message)
            raise DeviceRejected(message, code=code)
        return response


def _describe(table: str, address: int, count: int, writing: bool) -> str:
    return f"write {table} {address}" if writing else f"read {table} {address}+{count}"
