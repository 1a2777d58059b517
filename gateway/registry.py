"""The point registry: every point's static description, held once, built from config.

Samples carry only ``point``, ``value``, ``ts`` and ``quality``; unit, type, tags and measurement live here. The
registry is read-only after start-up (a reload builds a new one and swaps it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from gateway.model import split_point_id

ValueKind = Literal["float", "int", "bool", "str"]


@dataclass(frozen=True, slots=True)
class PointInfo:
    """Static facts about one point. ``id`` is ``device.name``."""

    id: str
    unit: str | None = None
    kind: ValueKind = "float"
    writable: bool = False
    min: float | None = None
    max: float | None = None
    description: str | None = None
    #: an energy meter's rating (kW): the most power it can measure; incentives flag readings implying more
    max_power_kw: float | None = None
    #: InfluxDB measurement; defaults to the device's profile name or driver
    measurement: str = "gateway"
    tags: Mapping[str, str] = field(default_factory=dict)
    #: False for derived and virtual points made by rules: nothing reads them from a device
    physical: bool = True
    #: personal data (an apartment's meter, a tenant's thermostat): never leaves the building raw. The platform
    #: uplink withholds it from telemetry and meta; InfluxDB only with ``include_personal: true``. Set by the point's
    #: or device's ``personal: true``, for every device holding a meter of ``incentives.accounts``, and for rule
    #: points computed from personal points (docs/privacy.md).
    personal: bool = False

    @property
    def device(self) -> str:
        return self.id.partition(".")[0]

    @property
    def name(self) -> str:
        return self.id.partition(".")[2]


class DuplicatePoint(ValueError):
    pass


class PointRegistry(Mapping[str, PointInfo]):
    """Point id -> PointInfo, plus devices -> their points. Duplicate ids are errors."""

    def __init__(self, points: Iterable[PointInfo] = ()) -> None:
        self._points: dict[str, PointInfo] = {}
        self._by_device: dict[str, list[str]] = {}
        for info in points:
            self.add(info)

    def add(self, info: PointInfo) -> None:
        split_point_id(info.id)  # raises ValueError for a malformed id
        if info.id in self._points:
            raise DuplicatePoint(f"duplicate point id {info.id!r}")
        self._points[info.id] = info
        self._by_device.setdefault(info.device, []).append(info.id)

    def __getitem__(self, point: str) -> PointInfo:
        return self._points[point]

    def __iter__(self) -> Iterator[str]:
        return iter(self._points)

    def __len__(self) -> int:
        return len(self._points)

    def devices(self) -> list[str]:
        return list(self._by_device)

    def points_of(self, device: str) -> list[str]:
        return list(self._by_device.get(device, ()))
