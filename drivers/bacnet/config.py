"""Config models of the BACnet/IP driver: the network entry, the device entry and the object-list profile.

Owns: ``BacnetNetworkConfig`` (a site's ``bacnet_networks:`` entry), ``BacnetDeviceConfig`` (a ``devices:`` entry with
``driver: bacnet``), ``BacnetProfile`` and ``BacnetPoint`` (``firmware_configs/devices/bacnet-<vendor>-<model>.yaml``),
and ``ENGINEERING_UNITS`` (BACnet engineering units -> our unit names); ``BacnetDeviceConfig.point_infos`` gives a
device's points with their kinds and units, what the plugin (drivers/bacnet/plugin.py) hands the registry.

Must never import bacpypes3 (a site file is validated without loading any protocol library) nor anything of the
runtime beyond ``gateway.config`` and ``gateway.registry``.
"""

from __future__ import annotations

import builtins
import ipaddress
import re
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Self

from pydantic import BeforeValidator, Field, field_validator, model_validator

from gateway.config.types import Ident, PositiveDuration, StrictModel, parse_duration
from gateway.points import profile_point_infos
from gateway.registry import PointInfo, ValueKind

#: object types a point may name, in bacpypes3's spelling (ASHRAE 135 clause 12 names, hyphenated)
ObjectType = Literal[
    "analog-input",
    "analog-output",
    "analog-value",
    "binary-input",
    "binary-output",
    "binary-value",
    "multi-state-input",
    "multi-state-output",
    "multi-state-value",
    "accumulator",
    "pulse-converter",
    "loop",
    "large-analog-value",
    "integer-value",
    "positive-integer-value",
    "character-string-value",
    "device",
]
ANALOG_TYPES = frozenset({"analog-input", "analog-output", "analog-value", "large-analog-value", "loop"})
BINARY_TYPES = frozenset({"binary-input", "binary-output", "binary-value"})
MULTISTATE_TYPES = frozenset({"multi-state-input", "multi-state-output", "multi-state-value"})
INTEGER_TYPES = frozenset({"accumulator", "integer-value", "positive-integer-value"})
#: objects with a priority array: a write to their present-value takes a priority slot and must be relinquished
COMMANDABLE_TYPES = frozenset(
    {
        "analog-output",
        "analog-value",
        "binary-output",
        "binary-value",
        "multi-state-output",
        "multi-state-value",
        "large-analog-value",
        "integer-value",
        "positive-integer-value",
    }
)
#: ASHRAE 135 clause 19.2.1.1: priority 6 is reserved for minimum on/off, 1 and 2 for life safety
RESERVED_PRIORITIES = frozenset({1, 2, 6})
#: highest device instance (4194303 is the wildcard "any device")
MAX_INSTANCE = 4194302
#: the largest APDU BACnet/IP carries (ASHRAE 135 clause 20.1.2.5, for an Ethernet-sized NPDU)
MAX_APDU_BACNET_IP = 1476

#: BACnet engineering units (bacpypes3 enum names) -> our unit names (drivers/mqtt/units.py spellings where they
#: exist). A unit outside this table is refused at load: a point's unit is a promise to the platform.
ENGINEERING_UNITS: dict[str, str] = {
    "degrees-celsius": "°C",
    "degrees-fahrenheit": "°F",
    "degrees-kelvin": "K",
    "percent": "%",
    "percent-relative-humidity": "%RH",
    "parts-per-million": "ppm",
    "pascals": "Pa",
    "hectopascals": "hPa",
    "kilopascals": "kPa",
    "watts": "W",
    "kilowatts": "kW",
    "watt-hours": "Wh",
    "kilowatt-hours": "kWh",
    "megawatt-hours": "MWh",
    "volts": "V",
    "amperes": "A",
    "hertz": "Hz",
    "cubic-meters-per-hour": "m³/h",
    "cubic-meters-per-second": "m³/s",
    "liters-per-second": "l/s",
    "inches-of-water": "inH2O",
    "cubic-feet-per-minute": "cfm",
    "meters-per-second": "m/s",
    "luxes": "lx",
    "seconds": "s",
    "minutes": "min",
    "hours": "h",
    "no-units": "",
}

_OBJECT_RE = re.compile(r"\s*([a-z-]+)\s*,\s*(\d+)\s*\Z")
_PROPERTY_RE = re.compile(r"[a-z][a-z-]*[a-z]\Z")


class ObjectId(NamedTuple):
    type: str
    instance: int

    def __str__(self) -> str:
        return f"{self.type},{self.instance}"


def parse_object_id(value: Any) -> ObjectId:
    """``"analog-input,1"`` -> ``ObjectId("analog-input", 1)``; raises ValueError with what is wrong."""
    if isinstance(value, ObjectId):
        return value
    if not isinstance(value, str):
        raise ValueError(f"an object is written 'type,instance' (e.g. analog-input,1), not {value!r}")
    match = _OBJECT_RE.match(value)
    if match is None:
        raise ValueError(f"an object is written 'type,instance' (e.g. analog-input,1), not {value!r}")
    kind, instance = match.group(1), int(match.group(2))
    if kind not in ObjectType.__args__:  # type: ignore[attr-defined]
        raise ValueError(f"unknown or unsupported object type {kind!r} (use e.g. analog-input, binary-value)")
    if instance > MAX_INSTANCE:
        raise ValueError(f"object instance {instance} is past the highest, {MAX_INSTANCE}")
    return ObjectId(kind, instance)


def _property(value: Any) -> str:
    if not isinstance(value, str) or not _PROPERTY_RE.match(value):
        raise ValueError(f"a property is a BACnet property name like present-value, not {value!r}")
    return value


def _optional_duration(value: Any) -> float | None:
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("a poll interval must be greater than 0")
    return seconds


Priority = Annotated[int, Field(ge=1, le=16)]


class BacnetPoint(StrictModel):
    """One property of one object: ``{object: analog-input,1, unit: degrees-celsius}``.

    ``unit`` is a BACnet engineering unit name (mapped through ``ENGINEERING_UNITS``) so a profile reads like the
    device's object list. A writable point is written at ``priority`` (default 8, "manual operator" slots 1-7 are
    above it) and relinquished by writing NULL at that same priority.
    """

    object: Annotated[ObjectId, BeforeValidator(parse_object_id)]
    property: Annotated[str, BeforeValidator(_property)] = "present-value"
    #: an element of an array property (e.g. one slot of priority-array)
    index: Annotated[int, Field(ge=0)] | None = None
    unit: str | None = None
    description: str | None = None
    poll: Annotated[float | None, BeforeValidator(_optional_duration)] = None
    writable: bool = False
    min: float | None = None
    max: float | None = None
    priority: Priority = 8
    #: multi-state points: state number -> label (for docs and discover output; samples carry the number)
    states: dict[int, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    personal: bool = False

    @field_validator("unit")
    @classmethod
    def _known_unit(cls, value: str | None) -> str | None:
        if value is not None and value not in ENGINEERING_UNITS:
            raise ValueError(
                f"unknown BACnet engineering unit {value!r}; known: {', '.join(sorted(ENGINEERING_UNITS))}"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        kind = self.object.type
        if self.writable:
            if self.property != "present-value":
                raise ValueError("only present-value can be written (other properties are configuration)")
            if kind not in COMMANDABLE_TYPES:
                raise ValueError(f"a {kind} cannot be written: it has no priority array (inputs are read-only)")
            if self.priority in RESERVED_PRIORITIES:
                raise ValueError(
                    f"priority {self.priority} is reserved (1-2 life safety, 6 minimum on/off); use 8 (manual "
                    "operator) or 9-16"
                )
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if self.unit is not None and kind not in ANALOG_TYPES | INTEGER_TYPES:
            raise ValueError(f"a {kind} has no engineering unit; leave 'unit' out")
        return self

    @builtins.property
    def kind(self) -> ValueKind:
        if self.property != "present-value":
            return "float" if self.property in ("high-limit", "low-limit", "cov-increment") else "str"
        kind = self.object.type
        if kind in BINARY_TYPES:
            return "bool"
        if kind in MULTISTATE_TYPES or kind in INTEGER_TYPES:
            return "int"
        if kind == "character-string-value":
            return "str"
        return "float"

    @builtins.property
    def our_unit(self) -> str | None:
        if self.unit is None:
            return None
        return ENGINEERING_UNITS[self.unit] or None


class BacnetProfile(StrictModel):
    """A device's object list (``firmware_configs/devices/bacnet-<vendor>-<model>.yaml``)."""

    driver: Literal["bacnet"]
    vendor: str
    model: str
    #: the public document the object list follows (title, revision)
    doc: str
    #: which part of the device's objects the profile maps
    coverage: str | None = None
    description: str | None = None
    measurement: Ident | None = None
    points: dict[Ident, BacnetPoint]

    @model_validator(mode="after")
    def _unique_properties(self) -> Self:
        if not self.points:
            raise ValueError("a profile needs at least one point")
        seen: dict[tuple[ObjectId, str, int | None], str] = {}
        for name, spec in self.points.items():
            key = (spec.object, spec.property, spec.index)
            if key in seen:
                raise ValueError(f"{name} reads the same property as {seen[key]} ({spec.object} {spec.property})")
            seen[key] = name
        return self

    @property
    def measurement_name(self) -> str:
        if self.measurement:
            return self.measurement
        name = re.sub(r"[^a-z0-9]+", "_", self.model.lower()).strip("_")
        return name if name and name[0].isalpha() else f"m_{name}"


def _host_port(value: Any) -> str:
    """``"192.168.1.20"`` or ``"192.168.1.20:47809"`` (IPv4; BACnet/IP is IPv4)."""
    if not isinstance(value, str):
        raise ValueError(f"an address is 'a.b.c.d' or 'a.b.c.d:port', not {value!r}")
    host, _, port = value.partition(":")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv4 address (BACnet/IP addresses are a.b.c.d[:port])") from None
    if port and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"port {port!r} is not a number from 1 to 65535")
    return value


HostPort = Annotated[str, BeforeValidator(_host_port)]


def _local_interface(value: Any) -> str:
    """``"192.168.1.5/24"`` (address and prefix, so the broadcast address is known) or ``"0.0.0.0"``."""
    if not isinstance(value, str):
        raise ValueError(f"the local address is 'a.b.c.d/prefix', not {value!r}")
    try:
        ipaddress.IPv4Interface(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address with an optional /prefix (e.g. 192.168.1.5/24)") from None
    return value


class ForeignDeviceConfig(StrictModel):
    """Register with a BBMD as a foreign device (the gateway is on another subnet than the devices)."""

    bbmd: HostPort
    #: registration lifetime; bacpypes3 renews it before it expires (ASHRAE 135 J.5.2.1 grace of 30 s)
    ttl: Annotated[PositiveDuration, Field(le=65535)] = 300.0


class BacnetNetworkConfig(StrictModel):
    """The gateway's BACnet/IP port: ``{id: bms, address: 192.168.1.5/24, port: 47808}``."""

    id: Ident
    address: Annotated[str, BeforeValidator(_local_interface)]
    port: Annotated[int, Field(ge=1, le=65535)] = 47808
    foreign: ForeignDeviceConfig | None = None
    #: how long to wait for one answer (the APDU timeout)
    timeout: PositiveDuration = 3.0
    #: extra attempts after a timeout before a device counts as silent
    retries: Annotated[int, Field(ge=0, le=5)] = 1
    #: first and longest time a silent device is skipped before it is tried again (doubling, with jitter)
    backoff_min: PositiveDuration = 1.0
    backoff_max: PositiveDuration = 60.0
    #: how long a Who-Is for a device without an address waits for its I-Am
    discover_timeout: PositiveDuration = 3.0
    #: the most properties one ReadPropertyMultiple may ask for, whatever the device's APDU size allows
    max_properties: Annotated[int, Field(ge=1, le=500)] = 100

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.backoff_min > self.backoff_max:
            raise ValueError("backoff_min is greater than backoff_max")
        return self

    @property
    def bind(self) -> str:
        """The address bacpypes3 binds, ``a.b.c.d/prefix:port``."""
        return f"{self.address}:{self.port}"


class CovConfig(StrictModel):
    """Subscribe to changes of value instead of polling each cycle (polling stays on as a safety net)."""

    confirmed: bool = False
    #: subscription lifetime; renewed at half of it, so one lost renewal does not let it lapse
    lifetime: Annotated[PositiveDuration, Field(ge=2, le=86400)] = 300.0
    #: how often the points under COV are still polled: the safety net that finds a silent subscription (a device
    #: restarted, a notification lost) by a value that changed without a notification, and resubscribes
    verify: PositiveDuration = 300.0


class BacnetDeviceConfig(StrictModel):
    """``{id: vav3, driver: bacnet, profile: bacnet-generic-vav, network: bms, instance: 3001, poll: 10s}``"""

    profile_model: ClassVar[type[StrictModel]] = BacnetProfile

    id: Ident
    driver: Literal["bacnet"]
    profile: str
    network: Ident
    #: the device object's instance number: how BACnet names a device, whatever its address
    instance: Annotated[int, Field(ge=0, le=MAX_INSTANCE)]
    #: its BACnet/IP address; without it, the gateway finds it with Who-Is / I-Am at start
    address: HostPort | None = None
    poll: PositiveDuration = 10.0
    #: use ReadPropertyMultiple (None: yes unless the device refuses it, which is then learned)
    read_multiple: bool | None = None
    #: override of the device's max-APDU-length-accepted (bytes) when it states more than it answers
    max_apdu: Annotated[int, Field(ge=50, le=MAX_APDU_BACNET_IP)] | None = None
    cov: CovConfig | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    personal: bool = False

    def point_infos(self, profile: StrictModel) -> list[PointInfo]:
        assert isinstance(profile, BacnetProfile)
        return profile_point_infos(
            self.id,
            profile.points,
            measurement=profile.measurement_name,
            base_tags={"device": self.id, "vendor": profile.vendor, "model": profile.model, **self.tags},
            personal=self.personal,
            # a profile names BACnet engineering units; the registry holds the gateway's
            unit_of=lambda spec: spec.our_unit,
            tags_of=lambda spec: spec.tags,
        )

    def interval_of(self, spec: BacnetPoint) -> float:
        return spec.poll if spec.poll is not None else self.poll
