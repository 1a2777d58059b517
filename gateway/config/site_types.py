"""What a loaded site is: ``Site``, the typed face of its schema (``SiteConfig``) and the sections every site has.

The loader (``gateway.config.site``) assembles the validated schema from the driver and uplink plugins a site uses
and returns a ``Site``; the plugin registry (``gateway.plugins``) types its hooks with these classes. Both import this
module, so it must never import either of them (tests/unit/test_import_cycles.py keeps the module graph acyclic).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Protocol, TypeVar

from pydantic import Field, field_validator

from gateway.config.source import Loc, SourceMap
from gateway.config.types import Ident, PointId, PositiveDuration, Size, StrictModel
from gateway.errors import Diagnostic
from gateway.registry import PointRegistry

if TYPE_CHECKING:
    from gateway.incentives.config import IncentivesConfig
    from gateway.uplinks.config import UplinksConfig


class DeviceEntry(Protocol):
    """What every ``devices:`` entry has, whichever driver reads it."""

    @property
    def id(self) -> str: ...

    @property
    def driver(self) -> str: ...

    @property
    def personal(self) -> bool: ...


class GatewayIdentity(StrictModel):
    #: used in MQTT topics and as a tag on every series: keep it stable once data flows
    id: Ident
    site: Ident
    name: str | None = None
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name like Asia/Shanghai)") from None
        return value


class StorageConfig(StrictModel):
    """The outbox. ``durability: process`` survives a crash or kill -9; ``power`` also survives a power cut
    (fsync on every commit, several times slower on SD cards)."""

    durability: Literal["process", "power"] = "process"
    telemetry_budget: Size = 256 * 1024**2
    event_budget: Size = 64 * 1024**2


#: a ``Host`` header value: a DNS name, an IPv4 address or a bracketed IPv6 address, and an optional port
_HOST_ENTRY = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?")


class HttpConfig(StrictModel):
    listen: str = "127.0.0.1:8080"
    enabled: bool = True
    #: required for any bind other than loopback
    token_file: Path | None = None
    #: extra names the page may be reached by, as the browser sends them in ``Host`` (``gateway.example.org`` or
    #: ``gateway.example.org:8443``; without a port, on any port, e.g. behind a proxy). Always allowed: ``localhost``,
    #: ``127.0.0.1`` and ``[::1]`` with the port the server listens on, and the address a request arrived at. Any
    #: other ``Host`` is refused (421), so a web page cannot read the status page through DNS rebinding.
    allowed_hosts: list[str] = Field(default_factory=list)

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _HOST_ENTRY.fullmatch(name):
                raise ValueError(f"{name!r} is not a host name, optionally with :port (e.g. gateway.example.org:8443)")
        return [name.lower() for name in names]


class BuildingAggregateConfig(StrictModel):
    """The one way household meters reach the platform outside incentive records: their sum, as one building point.

    Sent once per ``every`` (aligned to the UTC grid), and only when *every* meter has a good reading no older than
    ``max_age`` (default ``every``): a sum over a changing set of meters would give one meter away as the difference
    of two sums, and a sum sent after each single reading would give away that reading's increase. At least
    ``min_meters`` meters (3 or more: with two, each household learns the other's figures by subtracting its own).
    """

    point: PointId = "building.energy_kwh_total"
    #: default: every meter of ``incentives.accounts``
    meters: list[PointId] | None = None
    min_meters: Annotated[int, Field(ge=3)] = 3
    every: PositiveDuration = 900.0
    max_age: PositiveDuration | None = None

    @property
    def freshness(self) -> float:
        return self.max_age if self.max_age is not None else self.every


class PrivacyConfig(StrictModel):
    """``privacy:``. What is personal is said on points and devices (``personal: true``) and by
    ``incentives.accounts``; this block holds what the platform may get instead."""

    building_aggregate: BuildingAggregateConfig | None = None


_Entry = TypeVar("_Entry", bound=StrictModel)


class SiteConfig(StrictModel):
    """A site file. The model validated is ``site_model(drivers)``: this class with the devices union and the
    top-level sections (``modbus_buses:``, ``mqtt_sources:``) of the driver plugins the file uses, and one key per
    uplink plugin under ``uplinks:``, assembled from the registry (gateway/plugins.py). The fields are declared
    there, in the file's order; here they are typed for the code that reads them."""

    if TYPE_CHECKING:
        version: Literal[1]
        gateway: GatewayIdentity
        storage: StorageConfig
        http: HttpConfig
        devices: list[DeviceEntry]
        uplinks: UplinksConfig
        rules: list[str]
        incentives: IncentivesConfig | None
        privacy: PrivacyConfig
        profile_dirs: list[str]

    def section(self, key: str, model: type[_Entry]) -> list[_Entry]:
        """The entries of a driver's top-level section (``modbus_buses``), typed; [] when no plugin declares it."""
        items = self.__dict__.get(key)
        if not isinstance(items, list):
            return []
        return [item for item in items if isinstance(item, model)]

    def section_ids(self, key: str) -> list[str]:
        """The ids of a section's entries, in file order."""
        items = self.__dict__.get(key)
        ids: list[str] = []
        for item in items if isinstance(items, list) else []:
            ident = item.__dict__.get("id") if isinstance(item, StrictModel) else None
            if isinstance(ident, str):
                ids.append(ident)
        return ids


@dataclass(frozen=True)
class Site:
    """A validated site with everything it references resolved."""

    path: Path
    config: SiteConfig
    #: device id -> its validated profile (absent for drivers without profiles)
    profiles: Mapping[str, StrictModel]
    registry: PointRegistry
    rule_files: tuple[Path, ...]
    source_map: SourceMap
    #: problems that do not stop the gateway (a literal secret); ``check --strict`` treats them as errors
    warnings: tuple[Diagnostic, ...] = ()

    def diagnostic(self, loc: Loc, message: str) -> Diagnostic:
        """Position a problem found after loading (e.g. an incentive meter that names no point)."""
        return self.source_map.diagnostic(loc, message)
