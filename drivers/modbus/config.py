"""Config models of the Modbus driver: the bus entry, the device entry and the register-map profile.

Owns: ``ModbusBusConfig`` (a site's ``modbus_buses:`` entry), ``ModbusDeviceConfig`` (a ``devices:`` entry with
``driver: modbus``), ``ModbusProfile`` and ``ModbusPoint`` (``firmware_configs/devices/<vendor>-<model>.yaml``), and
the static facts about data types (``TYPE_WIDTH``) that the codec, planner and CLI share.

Must never import pymodbus (a site file is validated without loading any protocol library) nor anything of the
runtime beyond ``gateway.config`` and ``gateway.registry``.

Every rule a profile must obey is checked here, at load, so that a wrong register map fails with ``file:line:col``
before the gateway ever talks to a device: a 32-bit type with a 16-bit order, two points overlapping, an address
past 65535, a writable input register, a bit of a register marked writable, and so on.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BeforeValidator, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from gateway.config.types import Duration, EnvStr, Ident, PositiveDuration, StrictModel, parse_duration
from gateway.points import profile_point_infos
from gateway.registry import PointInfo, ValueKind

Table = Literal["holding", "input", "coil", "discrete"]
DataType = Literal["u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64", "bool", "string"]
#: byte order of a 16-bit value (or of each register of a string): AB is the Modbus standard, BA swaps the bytes
Order16 = Literal["AB", "BA"]
#: order of a 32/64-bit value in the vocabulary engineers know; for 64-bit values the letters name the pattern
#: (CDAB = registers low word first, BADC = bytes swapped in each register, DCBA = fully little-endian)
OrderWide = Literal["ABCD", "CDAB", "BADC", "DCBA"]

#: registers per value; ``string`` takes its width from ``length`` and ``bool`` is one bit (coil/discrete) or
#: one bit of a register
TYPE_WIDTH: dict[str, int] = {"u16": 1, "i16": 1, "u32": 2, "i32": 2, "u64": 4, "i64": 4, "f32": 2, "f64": 4}
BIT_TABLES = frozenset({"coil", "discrete"})
WRITABLE_TABLES = frozenset({"holding", "coil"})
#: protocol limits of one read (Modbus application protocol v1.1b3, function codes 1-4)
MAX_READ_REGISTERS = 125
MAX_READ_BITS = 2000


def _optional_duration(value: Any) -> float | None:
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("a poll interval must be greater than 0")
    return seconds


class ModbusPoint(StrictModel):
    """One value in a register map.

    ``address`` is the 0-based protocol address, as sent on the wire (a document's "register 30001" or "40001"
    is address 0). ``value = raw * scale + offset``; a write does the inverse and refuses values outside
    ``min``/``max`` (engineering units) or outside what the type can hold.
    """

    table: Table
    address: Annotated[int, Field(ge=0, le=65535)]
    type: DataType | None = None
    order: str | None = None
    #: the bit (0 = least significant) of a register, for ``type: bool`` on holding/input tables
    bit: Annotated[int, Field(ge=0, le=15)] | None = None
    #: registers of a ``string`` point
    length: Annotated[int, Field(ge=1, le=MAX_READ_REGISTERS)] | None = None
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
    description: str | None = None
    #: overrides the device's poll interval for this point
    poll: Annotated[float | None, BeforeValidator(_optional_duration)] = None
    writable: bool = False
    min: float | None = None
    max: float | None = None
    #: after a write, read the point back and fail the write unless the device holds what was written
    readback: bool = False
    tags: dict[str, str] = Field(default_factory=dict)
    #: personal data (a tenant's consumption): never sent raw to the city platform (docs/privacy.md)
    personal: bool = False
    #: an energy meter's rating in kW (the most power it can measure): incentive readings implying more are flagged
    max_power_kw: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        in_bits = self.table in BIT_TABLES
        if in_bits:
            if self.type not in (None, "bool"):
                raise ValueError(f"a {self.table} is one bit: its type is bool, not {self.type}")
            for key in ("order", "bit", "length"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key!r} does not apply to a {self.table} (a single bit)")
        elif self.type is None:
            raise ValueError(f"a point in the {self.table} table needs a type ({', '.join(TYPE_WIDTH)}, bool, string)")
        if self.type == "bool" and not in_bits and self.bit is None:
            raise ValueError("a bool in a register table needs 'bit' (0-15): which bit of the register")
        if self.bit is not None and self.type != "bool":
            raise ValueError("'bit' is only for type bool (one bit of a register)")
        if self.type == "string" and self.length is None:
            raise ValueError("a string needs 'length': how many registers it spans (2 characters each)")
        if self.length is not None and self.type != "string":
            raise ValueError("'length' is only for type string")
        if self.order is not None:
            self._check_order()
        if self.address + self.width - 1 > 65535:
            raise ValueError(f"{self.type} at address {self.address} ends past the last address 65535")
        if self.scale == 0:
            raise ValueError("scale cannot be 0 (the value could never be written back or told apart)")
        if (self.scale != 1 or self.offset != 0) and self.type in ("bool", "string", None):
            raise ValueError(f"scale and offset do not apply to {self.type or 'bool'} points")
        if self.writable:
            if self.table not in WRITABLE_TABLES:
                raise ValueError(f"a {self.table} cannot be written: only holding registers and coils can")
            if self.type == "string":
                raise ValueError("string points cannot be written")
            if self.bit is not None:
                raise ValueError(
                    "a bit of a register cannot be written safely (it needs a read-modify-write that races the "
                    "device); map a coil or the whole register instead"
                )
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if self.readback and not self.writable:
            raise ValueError("'readback' only applies to writable points")
        return self

    def _check_order(self) -> None:
        wide = self.width > 1 and self.type != "string"
        allowed: tuple[str, ...] = ("ABCD", "CDAB", "BADC", "DCBA") if wide else ("AB", "BA")
        if self.order not in allowed:
            what = f"a {TYPE_WIDTH[self.type or 'u16'] * 16}-bit {self.type}" if wide else f"a 16-bit {self.type}"
            if self.type == "string":
                what = "a string (byte order within each register)"
            raise ValueError(f"order {self.order!r} does not fit {what}: use one of {', '.join(allowed)}")

    @property
    def width(self) -> int:
        """Registers (or bits, for coil/discrete) this point occupies."""
        if self.table in BIT_TABLES or self.type == "bool":
            return 1
        if self.type == "string":
            return self.length or 1
        return TYPE_WIDTH[self.type or "u16"]

    @property
    def kind(self) -> ValueKind:
        if self.type == "bool" or self.table in BIT_TABLES:
            return "bool"
        if self.type == "string":
            return "str"
        if self.type in ("f32", "f64") or self.scale != 1 or self.offset != 0:
            return "float"
        return "int"

    def effective_order(self, profile_order: str) -> str:
        """The point's own order, else the profile's default for multi-register types, else AB."""
        if self.order is not None:
            return self.order
        if self.width > 1 and self.type != "string":
            return profile_order
        return "AB"


def _point_error(loc: tuple[str | int, ...], message: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("profile", message), loc=loc, input=value)


class ModbusProfile(StrictModel):
    """A device's register map (``firmware_configs/devices/<vendor>-<model>.yaml``)."""

    driver: Literal["modbus"]
    vendor: str
    model: str
    #: the public document the map follows (title, revision): an engineer on site must be able to check it
    doc: str
    #: what part of the device's register map the profile maps ("measurements 30001-30086 and the energy
    #: counters; no setup registers"), so an engineer knows whether a missing value is unmapped or unavailable
    coverage: str | None = None
    description: str | None = None
    #: default order of 32/64-bit values; points may override it
    order: OrderWide = "ABCD"
    #: InfluxDB measurement; defaults to the model, lowercased with non-alphanumerics as _
    measurement: Ident | None = None
    #: register holes the planner may read through for this device; 0 for devices that answer exception 2 when
    #: a read touches an unmapped register. None means the bus default.
    max_fill: Annotated[int, Field(ge=0, le=MAX_READ_REGISTERS)] | None = None
    #: some devices answer fewer registers per read than the protocol allows
    max_registers: Annotated[int, Field(ge=1, le=MAX_READ_REGISTERS)] = MAX_READ_REGISTERS
    points: dict[Ident, ModbusPoint]

    @model_validator(mode="wrap")
    @classmethod
    def _no_overlaps(cls, data: Any, handler: Any) -> ModbusProfile:
        profile: ModbusProfile = handler(data)
        # Raised as a ValidationError so each error is positioned at the point that collides, not at the file.
        errors = [
            _point_error(("points", name, "address"), message, spec.address)
            for name, spec, message in profile._overlaps()
        ]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        if not profile.points:
            raise ValueError("a profile needs at least one point")
        return profile

    def _overlaps(self) -> list[tuple[str, ModbusPoint, str]]:
        """Whole-register points may not share a register; bits may not share a bit. A bit point may sit on a
        register that is also read whole (a status word and its flags), which is common in device documents."""
        found: list[tuple[str, ModbusPoint, str]] = []
        whole: dict[tuple[str, int], str] = {}
        bits: dict[tuple[str, int, int], str] = {}
        for name, spec in self.points.items():
            if spec.bit is not None:
                key = (spec.table, spec.address, spec.bit)
                if key in bits:
                    found.append(
                        (
                            name,
                            spec,
                            f"{name} uses the same bit as {bits[key]} ({spec.table} {spec.address} bit {spec.bit})",
                        )
                    )
                bits.setdefault(key, name)
                continue
            for address in range(spec.address, spec.address + spec.width):
                other = whole.get((spec.table, address))
                if other is not None:
                    found.append((name, spec, f"{name} overlaps {other} at {spec.table} address {address}"))
                    break
            for address in range(spec.address, spec.address + spec.width):
                whole.setdefault((spec.table, address), name)
        return found

    @property
    def measurement_name(self) -> str:
        if self.measurement:
            return self.measurement
        name = re.sub(r"[^a-z0-9]+", "_", self.model.lower()).strip("_")
        return name if name and name[0].isalpha() else f"m_{name}"


class ModbusBusConfig(StrictModel):
    """One physical bus: a serial line (RTU) or one TCP endpoint (a device or a TCP-to-RTU gateway).

    Exactly one request is in flight per bus; devices on it are polled in turn.
    """

    id: Ident
    type: Literal["tcp", "rtu"]
    # TCP
    host: EnvStr | None = None
    port: Annotated[int, Field(ge=1, le=65535)] = 502
    # RTU
    serial: str | None = None
    baudrate: Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    #: how long to wait for one answer
    timeout: PositiveDuration = 1.0
    #: extra attempts after a timeout before a device counts as failed (its points go BAD, its breaker opens)
    retries: Annotated[int, Field(ge=0, le=5)] = 1
    #: silence between frames; default for RTU is 3.5 character times (at least 1.75 ms), 0 for TCP
    frame_gap: Duration | None = None
    #: register holes the planner may read through to merge two requests into one
    max_fill: Annotated[int, Field(ge=0, le=MAX_READ_REGISTERS)] = 8
    #: bit holes the planner may read through (coils, discrete inputs)
    max_fill_bits: Annotated[int, Field(ge=0, le=MAX_READ_BITS)] = 64
    #: first and longest wait before reconnecting a lost bus (doubling in between, +/-20% jitter). Short on
    #: purpose: readings come back within about ``reconnect_max`` of the device, and a refused TCP connect costs
    #: nothing (gateway/reconnect.py)
    reconnect_min: PositiveDuration = 0.25
    reconnect_max: PositiveDuration = 2.0
    #: first and longest time a silent device is skipped before it is tried again (doubling in between, with
    #: jitter). Each try of a silent slave costs ``timeout`` of bus time, so this is longer than the reconnect wait
    backoff_min: PositiveDuration = 0.5
    backoff_max: PositiveDuration = 10.0
    #: most registers one read may ask of any device on this bus (some TCP-to-RTU converters and many meters
    #: refuse more with exception 3); a device entry or its profile may set a smaller one. None: 125.
    max_registers: Annotated[int, Field(ge=1, le=MAX_READ_REGISTERS)] | None = None

    @model_validator(mode="after")
    def _transport(self) -> Self:
        if self.type == "tcp":
            if not self.host:
                raise ValueError("a tcp bus needs 'host'")
            if self.serial is not None:
                raise ValueError("'serial' is for rtu buses; a tcp bus has host and port")
        else:
            if not self.serial:
                raise ValueError("an rtu bus needs 'serial' (the serial device, e.g. /dev/ttyUSB0)")
            if self.host is not None:
                raise ValueError("'host' is for tcp buses; an rtu bus has serial and baudrate")
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min is greater than reconnect_max")
        if self.backoff_min > self.backoff_max:
            raise ValueError("backoff_min is greater than backoff_max")
        return self

    @property
    def gap_s(self) -> float:
        """Silence to keep between the end of one frame and the start of the next."""
        if self.frame_gap is not None:
            return self.frame_gap
        if self.type == "tcp":
            return 0.0
        bits_per_char = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        # Modbus over serial line v1.02 §2.5.1.1: 3.5 characters, fixed at 1.75 ms above 19200 baud
        return max(3.5 * bits_per_char / self.baudrate, 0.00175)

    def describe(self) -> str:
        if self.type == "tcp":
            return f"tcp {self.host}:{self.port}"
        return f"rtu {self.serial} {self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"


class ModbusDeviceConfig(StrictModel):
    """``{id: meter1, driver: modbus, profile: eastron-sdm630, bus: rs485_1, unit: 1, poll: 1s}``"""

    profile_model: ClassVar[type[StrictModel]] = ModbusProfile

    id: Ident
    driver: Literal["modbus"]
    profile: str
    bus: Ident
    #: the slave address (unit id); 0 is broadcast and never answers, so it cannot be polled
    unit: Annotated[int, Field(ge=1, le=255)]
    poll: PositiveDuration = 1.0
    tags: dict[str, str] = Field(default_factory=dict)
    #: every point of this device is personal data (an apartment's meter), whatever the shared profile says
    personal: bool = False
    #: most registers one read may ask of this device, when it refuses more (exception 3) than its profile says;
    #: the smallest of device, bus and profile wins. Unset, the scheduler also learns it from the refusals.
    max_registers: Annotated[int, Field(ge=1, le=MAX_READ_REGISTERS)] | None = None

    def point_infos(self, profile: StrictModel) -> list[PointInfo]:
        assert isinstance(profile, ModbusProfile)
        return profile_point_infos(
            self.id,
            profile.points,
            measurement=profile.measurement_name,
            base_tags={"device": self.id, "vendor": profile.vendor, "model": profile.model, **self.tags},
            personal=self.personal,
            unit_of=lambda spec: spec.unit,
            tags_of=lambda spec: spec.tags,
            rating_of=lambda spec: spec.max_power_kw,
        )

    def interval_of(self, spec: ModbusPoint) -> float:
        return spec.poll if spec.poll is not None else self.poll
