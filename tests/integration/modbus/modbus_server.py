"""A real pymodbus server for the Modbus integration tests and the benchmark, run as its own process.

Runs in a separate process so that (1) a test can kill and restart it like a real device losing power, (2) its
CPU is not counted as the gateway's in ``bench/modbus.py``, and (3) pymodbus's deprecation and log noise stays out
of the test process. Usage::

    python modbus_server.py --tcp PORT   --units 1,2,3 [--dead 4] [--refuse 5:2] [--limit 6:60] [--hole 7:3-5]
    python modbus_server.py --serial DEV --baud 9600 --units 1,2 --dead 3

Every live unit U has holding register i = U*1000 + i, input register i = U*100 + i, and coils alternating
True/False from coil 0. A ``--dead`` unit never answers (its requests hang, as on a real silent slave); a
``--refuse U:CODE`` unit answers every request with exception CODE; a ``--limit U:N`` unit answers register reads of
more than N registers with exception 3 (illegal data value), as many Eastron and Chinese-made meters do, and
serves smaller ones; a ``--hole U:A-B`` unit has no holding registers A..B, so a read through them is answered
with exception 2 (illegal data address), as many drives do. Prints ``ready`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import warnings

warnings.simplefilter("ignore")
logging.disable(logging.CRITICAL)

from pymodbus.constants import ExcCodes  # noqa: E402
from pymodbus.server import ModbusSerialServer, ModbusTcpServer  # noqa: E402
from pymodbus.simulator import DataType, SimData, SimDevice  # noqa: E402

#: holding registers set by ``--words`` on every unit (address -> word), over the unit*1000+address pattern
WORDS: dict[int, int] = {}


def _device(unit: int, holding: int, inputs: int, action: object = None, hole: range = range(0)) -> SimDevice:
    values = [WORDS.get(i, (unit * 1000 + i) & 0xFFFF) for i in range(holding)]
    # registers in ``hole`` are not mapped: a read touching them is answered with exception 2
    mapped = [(0, values[: hole.start])] if hole else [(0, values)]
    if hole:
        mapped.append((hole.stop, values[hole.stop :]))
    blocks = (
        [SimData(0, values=[i % 2 == 0 for i in range(64)], datatype=DataType.BITS)],
        [SimData(0, values=[i % 3 == 0 for i in range(64)], datatype=DataType.BITS)],
        [SimData(start, values=part, datatype=DataType.REGISTERS) for start, part in mapped],
        [SimData(0, values=[(unit * 100 + i) & 0xFFFF for i in range(inputs)], datatype=DataType.REGISTERS)],
    )
    return SimDevice(id=unit, simdata=blocks, action=action)  # type: ignore[arg-type]


async def _hang(*_args: object) -> ExcCodes | None:
    await asyncio.sleep(3600)
    return None


def _refuse(code: int):  # type: ignore[no-untyped-def]
    async def refuse(*_args: object) -> ExcCodes | None:
        return ExcCodes(code)

    return refuse


def _limit(registers: int):  # type: ignore[no-untyped-def]
    async def limit(function_code: int, _start: int, _address: int, count: int, *_args: object) -> ExcCodes | None:
        if function_code in (3, 4) and count > registers:
            return ExcCodes.ILLEGAL_VALUE
        return None

    return limit


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tcp", type=int)
    parser.add_argument("--serial")
    parser.add_argument("--baud", type=int, default=9600)
    parser.add_argument("--units", default="1")
    parser.add_argument("--dead", default="")
    parser.add_argument("--refuse", default="")
    parser.add_argument("--limit", default="")
    parser.add_argument("--hole", default="")
    parser.add_argument("--holding", type=int, default=200)
    parser.add_argument("--input", type=int, default=100)
    parser.add_argument("--words", default="", help="ADDR:HEXWORD,... holding registers of every unit")
    args = parser.parse_args()
    for item in filter(None, args.words.split(",")):
        address, word = item.split(":")
        WORDS[int(address)] = int(word, 16)
    devices = [_device(int(u), args.holding, args.input) for u in args.units.split(",") if u]
    devices += [_device(int(u), args.holding, args.input, _hang) for u in args.dead.split(",") if u]
    for item in filter(None, args.refuse.split(",")):
        unit, code = item.split(":")
        devices.append(_device(int(unit), args.holding, args.input, _refuse(int(code))))
    for item in filter(None, args.limit.split(",")):
        unit, registers = item.split(":")
        devices.append(_device(int(unit), args.holding, args.input, _limit(int(registers))))
    for item in filter(None, args.hole.split(",")):
        unit, span = item.split(":")
        first, last = (int(n) for n in span.split("-"))
        devices.append(_device(int(unit), args.holding, args.input, hole=range(first, last + 1)))
    server: ModbusTcpServer | ModbusSerialServer
    if args.tcp:
        server = ModbusTcpServer(devices, address=("127.0.0.1", args.tcp))
    else:
        server = ModbusSerialServer(devices, port=args.serial, baudrate=args.baud)
    task = asyncio.ensure_future(server.serve_forever())
    await asyncio.sleep(0.3)
    print("ready", flush=True)
    await task


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
