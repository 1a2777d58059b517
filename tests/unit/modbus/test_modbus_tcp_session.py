"""``ModbusLink`` over TCP (the lean ``_TcpSession``) against a scripted device on a real loopback socket.

The device answers each request by a script entry: raw bytes (possibly in several chunks, possibly preceded by a
late answer to an earlier transaction), silence, or closing the connection. So the cases a real TCP-to-RTU
converter produces are shown exactly: split frames, stale transaction ids, exception codes, a silent unit (the
link stays up for a few timeouts, then drops so the scheduler re-opens it), a peer that hangs up, no listener.
Timeouts are 50 ms of real time: the wait is the thing under test, no sleep decides an outcome.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from drivers.modbus.client import ModbusLink
from drivers.modbus.config import ModbusBusConfig
from gateway.errors import DeviceRejected, DeviceUnavailable

#: what the device does with one request: chunks to send back, [] for silence, None to hang up
Reply = list[bytes] | None
Script = Callable[[int, int, bytes], Reply]  # (transaction id, unit, pdu) -> reply


def mbap(tid: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def registers_pdu(function: int, values: list[int]) -> bytes:
    return bytes([function, 2 * len(values)]) + struct.pack(f">{len(values)}H", *values)


@asynccontextmanager
async def scripted_device(script: Script) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A one-connection-at-a-time device on a free port; yields (port, the request PDUs it received)."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(7)
                tid, _proto, length, unit = struct.unpack(">HHHB", header)
                pdu = await reader.readexactly(length - 1)
                received.append(pdu)
                reply = script(tid, unit, pdu)
                if reply is None:
                    return
                for chunk in reply:
                    writer.write(chunk)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, received
    finally:
        server.close()
        await server.wait_closed()


def link_to(port: int) -> ModbusLink:
    bus = ModbusBusConfig.model_validate({"id": "t", "type": "tcp", "host": "127.0.0.1", "port": port})
    return ModbusLink(bus, timeout=0.05)


async def test_a_read_survives_split_frames_and_skips_a_late_answer_to_another_transaction() -> None:
    def script(tid: int, unit: int, pdu: bytes) -> Reply:
        assert pdu == bytes([3]) + struct.pack(">HH", 100, 3)
        late = mbap(tid - 1 if tid > 1 else 999, unit, registers_pdu(3, [9, 9, 9]))
        answer = mbap(tid, unit, registers_pdu(3, [0x1234, 0xABCD, 7]))
        return [late + answer[:5], answer[5:9], answer[9:]]

    async with scripted_device(script) as (port, received), link_to(port) as link:
        assert await link.read_register_bytes("holding", 5, 100, 3) == bytes.fromhex("1234abcd0007")
        assert await link.read_registers("holding", 5, 100, 3) == [0x1234, 0xABCD, 7]
        assert link.connected
    assert len(received) == 2


async def test_every_request_kind_goes_through_pymodbus_builders() -> None:
    def script(tid: int, unit: int, pdu: bytes) -> Reply:
        function = pdu[0]
        if function == 4:
            return [mbap(tid, unit, registers_pdu(4, [1, 2]))]
        if function == 1:
            return [mbap(tid, unit, bytes([1, 1, 0b101]))]
        return [mbap(tid, unit, pdu[:5])]  # writes (5, 6, 16) echo address and value/count

    async with scripted_device(script) as (port, received), link_to(port) as link:
        assert await link.read_registers("input", 1, 0, 2) == [1, 2]
        assert (await link.read_bits("coil", 1, 0, 3)) == [True, False, True]
        await link.write_registers(1, 40, [250])
        await link.write_registers(1, 41, [1, 2])
        await link.write_coil(1, 3, True)
    assert [pdu[0] for pdu in received] == [4, 1, 6, 16, 5]
    assert received[2] == bytes([6]) + struct.pack(">HH", 40, 250)


@pytest.mark.parametrize(("code", "error"), [(2, DeviceRejected), (11, DeviceUnavailable)])
async def test_exception_answers_become_our_errors(code: int, error: type[Exception]) -> None:
    async with (
        scripted_device(lambda tid, unit, pdu: [mbap(tid, unit, bytes([0x83, code]))]) as (port, _received),
        link_to(port) as link,
    ):
        with pytest.raises(error, match=f"exception {code}"):
            await link.read_register_bytes("holding", 1, 0, 2)
        assert link.connected  # the device answered: the connection is fine


async def test_a_short_answer_is_refused() -> None:
    async with (
        scripted_device(lambda tid, unit, pdu: [mbap(tid, unit, registers_pdu(3, [1]))]) as (port, _received),
        link_to(port) as link,
    ):
        with pytest.raises(DeviceRejected, match="answered 1 of 2 registers"):
            await link.read_register_bytes("holding", 1, 0, 2)


async def test_a_silent_unit_times_out_and_the_link_drops_only_after_several_in_a_row() -> None:
    answered = {"unit": 1}

    def script(tid: int, unit: int, pdu: bytes) -> Reply:
        return [mbap(tid, unit, registers_pdu(3, [5]))] if unit == answered["unit"] else []

    async with scripted_device(script) as (port, _received), link_to(port) as link:
        for _ in range(3):
            with pytest.raises(DeviceUnavailable, match="unit 2 did not answer"):
                await link.read_register_bytes("holding", 2, 0, 1)
        assert link.connected
        assert await link.read_register_bytes("holding", 1, 0, 1) == b"\x00\x05"  # an answer resets the count
        for _ in range(3):
            with pytest.raises(DeviceUnavailable):
                await link.read_register_bytes("holding", 2, 0, 1)
        assert link.connected
        with pytest.raises(DeviceUnavailable):
            await link.read_register_bytes("holding", 2, 0, 1)
        assert not link.connected  # four in a row: nothing answers on this connection any more
        with pytest.raises(DeviceUnavailable, match="not connected"):
            await link.read_register_bytes("holding", 1, 0, 1)


async def test_a_peer_hanging_up_mid_request_is_a_lost_link() -> None:
    async with scripted_device(lambda tid, unit, pdu: None) as (port, _received), link_to(port) as link:
        with pytest.raises(DeviceUnavailable, match="connection lost"):
            await link.read_register_bytes("holding", 1, 0, 1)
        assert not link.connected


async def test_no_listener_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: the connection is refused
        with pytest.raises(DeviceUnavailable, match="cannot connect"):
            async with link_to(port):
                pass


async def test_overlapping_requests_are_a_programming_error_not_a_mixed_up_answer() -> None:
    async with (
        scripted_device(lambda tid, unit, pdu: [mbap(tid, unit, registers_pdu(3, [unit]))]) as (port, _received),
        link_to(port) as link,
    ):
        first = asyncio.ensure_future(link.read_register_bytes("holding", 1, 0, 1))
        await asyncio.sleep(0)  # a yield, not a wait: the first request is now sent and pending
        with pytest.raises(RuntimeError, match="one Modbus request at a time"):
            await link.read_register_bytes("holding", 2, 0, 1)
        assert await first == b"\x00\x01"
