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
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any, Self

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

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


class ModbusLink:
    """One connection to a bus. ``async with ModbusLink(bus) as link:`` connects; leaving the block closes it.

    Requests must not overlap (the scheduler keeps one in flight). ``timeout`` bounds every request.
    """

    def __init__(self, bus: ModbusBusConfig, *, timeout: float | None = None) -> None:
        self._bus = bus
        self._timeout = bus.timeout if timeout is None else timeout
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None

    @property
    def name(self) -> str:
        return self._bus.describe()

    @property
    def connected(self) -> bool:
        return self._client is not None and bool(self._client.connected)

    async def __aenter__(self) -> Self:
        bus = self._bus
        # pymodbus's own reconnect is off (reconnect_delay=0) and retries=0: the scheduler owns both policies.
        client: AsyncModbusTcpClient | AsyncModbusSerialClient
        if bus.type == "tcp":
            client = AsyncModbusTcpClient(
                bus.host or "", port=bus.port, timeout=self._timeout, retries=0, reconnect_delay=0
            )
        else:
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

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _require(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        if self._client is None or not self._client.connected:
            raise DeviceUnavailable(f"{self.name} is not connected")
        return self._client

    async def read_registers(self, table: str, unit: int, address: int, count: int) -> list[int]:
        client = self._require()
        if table == "holding":
            call = client.read_holding_registers(address, count=count, device_id=unit)
        elif table == "input":
            call = client.read_input_registers(address, count=count, device_id=unit)
        else:
            raise ValueError(f"not a register table: {table}")
        response = await self._execute(call, unit, f"read {table} {address}+{count}")
        registers: list[int] = response.registers
        if len(registers) < count:
            raise DeviceRejected(f"unit {unit} answered {len(registers)} of {count} registers at {table} {address}")
        return registers[:count]

    async def read_bits(self, table: str, unit: int, address: int, count: int) -> list[bool]:
        client = self._require()
        if table == "coil":
            call = client.read_coils(address, count=count, device_id=unit)
        elif table == "discrete":
            call = client.read_discrete_inputs(address, count=count, device_id=unit)
        else:
            raise ValueError(f"not a bit table: {table}")
        response = await self._execute(call, unit, f"read {table} {address}+{count}")
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
        await self._execute(call, unit, f"write holding {address}")

    async def write_coil(self, unit: int, address: int, value: bool) -> None:
        client = self._require()
        await self._execute(client.write_coil(address, value, device_id=unit), unit, f"write coil {address}")

    async def _execute(self, call: Any, unit: int, what: str) -> Any:
        try:
            response = await call
        except ModbusException as exc:
            raise DeviceUnavailable(f"unit {unit} did not answer ({what}): {exc}") from exc
        except (OSError, TimeoutError) as exc:
            raise DeviceUnavailable(f"unit {unit} unreachable ({what}): {exc}") from exc
        if response.isError():
            code = int(getattr(response, "exception_code", 0) or 0)
            message = f"unit {unit} refused {what}: exception {code} ({exception_name(code)})"
            if code in _GATEWAY_SILENCE:
                raise DeviceUnavailable(message)
            raise DeviceRejected(message, code=code)
        return response
