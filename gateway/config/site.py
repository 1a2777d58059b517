"""The site file: what a gateway is, what it reads, where it sends data, which rules it runs.

``load_site(path)`` returns a fully resolved ``Site`` (config, device profiles, point registry, rule file paths) or
raises ``ConfigError`` listing every problem found as ``file:line:col: message``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator

from drivers.bacnet.config import BacnetDeviceConfig, BacnetNetworkConfig
from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig
from drivers.mqtt.config import MqttDeviceConfig, MqttSourceConfig
from drivers.simulator.config import SimulatorDeviceConfig
from gateway.config.source import Loc, SourceMap, load_yaml, validate
from gateway.config.types import Ident, LiteralSecret, PointId, PositiveDuration, Size, StrictModel, parse_size
from gateway.errors import ConfigError, Diagnostic
from gateway.incentives.config import IncentivesConfig
from gateway.registry import DuplicatePoint, PointInfo, PointRegistry
from gateway.uplinks.config import UplinksConfig

# parse_size is re-exported: driver configs parse sizes with the same rules
__all__ = ["FIRMWARE_CONFIGS", "Site", "SiteConfig", "aggregate_meters", "load_profile", "load_site", "parse_size"]

#: the repository's firmware_configs/ (device profiles, demo site, rule files)
FIRMWARE_CONFIGS = Path(
    os.environ.get("EDGE_GATEWAY_CONFIGS", Path(__file__).resolve().parents[2] / "firmware_configs")
)


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


DeviceConfig = Annotated[
    SimulatorDeviceConfig | ModbusDeviceConfig | MqttDeviceConfig | BacnetDeviceConfig, Field(discriminator="driver")
]


class SiteConfig(StrictModel):
    version: Literal[1]
    gateway: GatewayIdentity
    storage: StorageConfig = StorageConfig()
    http: HttpConfig = HttpConfig()
    modbus_buses: list[ModbusBusConfig] = Field(default_factory=list)
    mqtt_sources: list[MqttSourceConfig] = Field(default_factory=list)
    bacnet_networks: list[BacnetNetworkConfig] = Field(default_factory=list)
    devices: list[DeviceConfig] = Field(default_factory=list)
    uplinks: UplinksConfig = UplinksConfig()
    rules: list[str] = Field(default_factory=list)
    incentives: IncentivesConfig | None = None
    privacy: PrivacyConfig = PrivacyConfig()
    #: where device profiles are looked up, relative to the site file; the bundled profiles are always searched last
    profile_dirs: list[str] = Field(default_factory=lambda: ["../devices"])


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


def _profile_paths(site_path: Path, config: SiteConfig) -> list[Path]:
    dirs = [(site_path.parent / d).resolve() for d in config.profile_dirs]
    bundled = (FIRMWARE_CONFIGS / "devices").resolve()
    if bundled not in dirs:
        dirs.append(bundled)
    return dirs


def load_profile(name: str, model: type[StrictModel], search: list[Path]) -> StrictModel:
    """Find ``<name>.yaml`` in ``search`` and validate it; raise ConfigError (positions inside the profile)."""
    for directory in search:
        candidate = directory / f"{name}.yaml"
        if candidate.is_file():
            recovered: list[Diagnostic] = []
            data, smap = load_yaml(candidate, recovered=recovered)
            try:
                profile = validate(model, data, smap)
            except ConfigError as exc:
                raise ConfigError([*recovered, *exc.diagnostics]) from None
            if recovered:
                raise ConfigError(recovered)
            return profile
    raise FileNotFoundError(name)


def _same_place(section: str, position: int) -> int:
    return position


def _duplicate_ids(
    config: SiteConfig, smap: SourceMap, place: Callable[[str, int], int] = _same_place
) -> list[Diagnostic]:
    """Duplicate ids are errors (not last-one-wins), positioned at the second occurrence."""
    errors: list[Diagnostic] = []
    for key, what, ids in (
        ("devices", "device", [d.id for d in config.devices]),
        ("modbus_buses", "Modbus bus", [b.id for b in config.modbus_buses]),
        ("mqtt_sources", "MQTT source", [s.id for s in config.mqtt_sources]),
        ("bacnet_networks", "BACnet network", [n.id for n in config.bacnet_networks]),
    ):
        first: dict[str, int] = {}
        for position, ident in enumerate(ids):
            index = place(key, position)
            if ident in first:
                line = smap.values.get((key, first[ident], "id"), (0, 0))[0]
                errors.append(
                    smap.diagnostic((key, index, "id"), f"duplicate {what} id {ident!r} (first defined on line {line})")
                )
            else:
                first[ident] = index
    return errors


def _mqtt_binding_errors(
    config: SiteConfig, smap: SourceMap, place: Callable[[str, int], int] = _same_place
) -> list[Diagnostic]:
    """Whole-site MQTT checks (subscriptions named, one device per topic level), positioned at the device that
    introduces each problem: devices are added one at a time and only the new problems are attributed to it."""
    if not config.mqtt_sources:
        return []
    from drivers.mqtt.config import check_bindings

    errors: list[Diagnostic] = []
    known: set[str] = set()
    devices: list[MqttDeviceConfig] = []
    for index, device in enumerate(config.devices):
        if not isinstance(device, MqttDeviceConfig) or device.source not in {s.id for s in config.mqtt_sources}:
            continue
        devices.append(device)
        for problem in check_bindings(config.mqtt_sources, devices):
            if problem not in known:
                known.add(problem)
                errors.append(smap.diagnostic(("devices", place("devices", index)), problem))
    return errors


def _account_devices(config: SiteConfig) -> dict[str, str]:
    """Device id -> the first meter of ``incentives.accounts`` it holds.

    Every point of such a device is personal, not only the meter: an apartment's power, current or power factor
    draws the same daily life as its kWh counter (when someone is home, cooks, sleeps)."""
    devices: dict[str, str] = {}
    if config.incentives is not None:
        for account in config.incentives.accounts:
            for meter in account.meters:
                devices.setdefault(meter.partition(".")[0], meter)
    return devices


def _unpersonalised(device: DeviceConfig, meter: str, smap: SourceMap, loc: Loc) -> list[Diagnostic]:
    """An explicit ``personal: false`` on a device holding an account meter (or on one of its points) is an error:
    it cannot take effect, and silently ignoring it would let the file say the opposite of what the gateway does."""
    found: list[Loc] = []
    if "personal" in device.model_fields_set and not device.personal:
        found.append((*loc, "personal"))
    if isinstance(device, MqttDeviceConfig):
        for name, spec in device.points.items():
            if "personal" in spec.model_fields_set and not spec.personal:
                found.append((*loc, "points", name, "personal"))
    return [
        smap.diagnostic(
            where,
            f"device {device.id!r} holds the account meter {meter} (incentives.accounts): its points are personal "
            "data and cannot be declared personal: false",
        )
        for where in found
    ]


def literal_secrets(config: StrictModel, smap: SourceMap) -> list[Diagnostic]:
    """A warning at every secret written out in the file (``password: hunter2``) instead of ``${ENV}`` or a
    ``*_file`` key. Found by type (``SecretStr`` fields), not by key name: ``tls.key`` is a path and an MQTT
    command's ``key`` a JSON field, neither a secret."""
    found: list[Diagnostic] = []

    def walk(value: object, loc: Loc) -> None:
        if isinstance(value, LiteralSecret):
            key = str(loc[-1])
            where = ".".join(str(part) for part in loc)
            message = (
                f"{where} is a literal secret in the file: use {key}: ${{ENV_NAME}} (an environment variable) or "
                f"{key}_file: PATH"
            )
            diagnostic = smap.diagnostic(loc, message)
            found.append(replace(diagnostic, severity="warning"))
        elif isinstance(value, StrictModel):
            for name, field in type(value).model_fields.items():
                if name in value.model_fields_set:
                    walk(getattr(value, name), (*loc, field.alias or name))
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                walk(item, (*loc, index))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*loc, key))

    walk(config, ())
    return found


def aggregate_meters(config: SiteConfig) -> list[str]:
    """The meters the building aggregate sums: its own ``meters``, else every meter of ``incentives.accounts``."""
    aggregate = config.privacy.building_aggregate
    if aggregate is not None and aggregate.meters is not None:
        return list(dict.fromkeys(aggregate.meters))
    if config.incentives is None:
        return []
    return list(dict.fromkeys(m for account in config.incentives.accounts for m in account.meters))


def _building_aggregate(
    config: SiteConfig,
    aggregate: BuildingAggregateConfig,
    registry: PointRegistry,
    smap: SourceMap,
    unchecked: frozenset[str] = frozenset(),
) -> tuple[PointInfo | None, list[Diagnostic]]:
    """The aggregate's point, or the reasons it cannot be built (positioned in ``privacy.building_aggregate``).

    A meter of a device in ``unchecked`` (one that did not load, and is reported) is not blamed again."""
    loc: Loc = ("privacy", "building_aggregate")
    meters = aggregate_meters(config)
    problems: list[Diagnostic] = []
    #: a meter of a device that did not load: the aggregate cannot be built, and the device's error says why
    blocked = False
    for index, meter in enumerate(meters):
        info = registry.get(meter)
        where: Loc = (*loc, "meters", index) if aggregate.meters is not None else loc
        if info is None and meter.partition(".")[0] in unchecked:
            blocked = True
        elif info is None:
            problems.append(smap.diagnostic(where, f"building aggregate meter {meter!r} is not a point of any device"))
        elif info.kind not in ("float", "int"):
            problems.append(smap.diagnostic(where, f"building aggregate meter {meter!r} is {info.kind}, not a number"))
    if len(meters) < aggregate.min_meters:
        source = "meters" if aggregate.meters is not None else "incentives.accounts"
        problems.append(
            smap.diagnostic(
                (*loc, "meters") if aggregate.meters is not None else loc,
                f"the building aggregate needs at least {aggregate.min_meters} meters (min_meters); {source} names "
                f"{len(meters)}",
            )
        )
    if aggregate.point in registry:
        problems.append(smap.diagnostic((*loc, "point"), f"{aggregate.point!r} is already a device point"))
    if problems or blocked:
        return None, problems
    units = {registry[m].unit for m in meters}
    info = PointInfo(
        id=aggregate.point,
        unit=units.pop() if len(units) == 1 else None,
        kind="float",
        description=f"Sum of {len(meters)} household meters (privacy.building_aggregate)",
        measurement="building",
        tags={"device": aggregate.point.partition(".")[0]},
        physical=False,  # computed, not read: no driver owns it, and the platform's meta marks it derived
    )
    return info, []


@dataclass(frozen=True)
class PartialSite:
    """What a refused site file still says for checking its rule files: the rule files it names, the points of
    the devices that did load, and the devices that did not (their points cannot be checked, so they are not
    reported as unknown: the device's own error is)."""

    rule_files: tuple[Path, ...]
    registry: PointRegistry
    timezone: str
    unchecked_devices: frozenset[str]


class SiteError(ConfigError):
    """A refused site file: every problem found, and what is left of the site to check its rule files with."""

    def __init__(self, diagnostics: Iterable[Diagnostic], partial: PartialSite) -> None:
        super().__init__(diagnostics)
        self.partial = partial


#: the smallest valid site: what a section is validated beside, on its own, when the whole file did not validate
_STUB_SITE: dict[str, object] = {"version": 1, "gateway": {"id": "salvaged", "site": "salvaged"}}
#: sections checked item by item (one bad device must not take the others with it)
_ITEM_SECTIONS = ("modbus_buses", "mqtt_sources", "bacnet_networks", "devices", "rules", "profile_dirs")


@dataclass
class _Salvage:
    """A site that failed validation, with what did validate: a broken item or section is left out (its errors are
    already reported) and the ids it held remembered, so nothing that names it is blamed for it."""

    config: SiteConfig
    #: section -> the file index of each kept item (kept items keep their positions in messages)
    index: dict[str, list[int]]
    #: section -> the ids (and any other text) the broken items held; a section is a key here when any of it broke
    broken: dict[str, set[str]]


def _valid_alone(section: dict[str, object], context: object) -> bool:
    try:
        SiteConfig.model_validate({**_STUB_SITE, **section}, context=context)
    except ValidationError:
        return False
    return True


def _texts(value: object) -> set[str]:
    """Every text in a broken part, keys and values, however nested: the ids it may have defined."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return {t for key, item in value.items() for t in (*_texts(key), *_texts(item))}
    if isinstance(value, list):
        return {t for item in value for t in _texts(item)}
    return set()


def _salvage(data: object, context: object) -> _Salvage | None:
    """The parts of a site file that validate on their own, validated together; None when even that fails."""
    if not isinstance(data, dict):
        return None
    kept: dict[str, object] = dict(_STUB_SITE)
    index: dict[str, list[int]] = {}
    broken: dict[str, set[str]] = {}
    for key, value in data.items():
        if key not in SiteConfig.model_fields:
            continue  # an unknown key: reported, and nothing to keep
        if key in _ITEM_SECTIONS and isinstance(value, list):
            items = [(i, item) for i, item in enumerate(value) if _valid_alone({key: [item]}, context)]
            good = {i for i, _ in items}
            if len(good) < len(value):
                broken.setdefault(key, set())
            for i, item in enumerate(value):
                if i not in good and isinstance(item, dict) and isinstance(item.get("id"), str):
                    broken.setdefault(key, set()).add(item["id"])
            kept[key] = [item for _, item in items]
            index[key] = [i for i, _ in items]
        elif _valid_alone({key: value}, context):
            kept[key] = value
        else:
            broken.setdefault(key, set()).update(_texts(value))  # version and gateway keep the stub's
    try:
        config = SiteConfig.model_validate(kept, context=context)
    except ValidationError:
        return None
    return _Salvage(config, index, broken)


def load_site(path: Path | str, *, env: Mapping[str, str] | None = None) -> Site:
    """Load, validate and resolve a site file. Raises ConfigError with every problem found."""
    path = Path(path)
    # a duplicate key does not stop the load: validation goes on with the first value and reports the rest too
    recovered: list[Diagnostic] = []
    data, smap = load_yaml(path, recovered=recovered)
    context = {"env": env if env is not None else os.environ, "base_dir": path.parent}
    salvage: _Salvage | None = None
    try:
        config = validate(SiteConfig, data, smap, context=context)
    except ConfigError as exc:
        # every problem of the file is reported; the devices, buses and sections that did validate are still
        # checked (profiles, ids, rule files), so one bad device does not hide the next one's missing profile
        recovered.extend(exc.diagnostics)
        salvage = _salvage(data, context)
        if salvage is None:
            raise ConfigError(recovered) from None
        config = salvage.config
    index: dict[str, list[int]] = salvage.index if salvage is not None else {}
    broken: dict[str, set[str]] = salvage.broken if salvage is not None else {}

    def place(section: str, position: int) -> int:
        """The item's index in the file (items before it may have been left out as broken)."""
        return index[section][position] if section in index else position

    errors: list[Diagnostic] = [*recovered, *_duplicate_ids(config, smap, place)]
    # a device on a bus (or source) that is itself broken is not blamed for it; the device is still checked
    bus_ids = {b.id for b in config.modbus_buses} | broken.get("modbus_buses", set())
    source_ids = {s.id for s in config.mqtt_sources} | broken.get("mqtt_sources", set())
    network_ids = {n.id for n in config.bacnet_networks} | broken.get("bacnet_networks", set())
    #: devices whose points are not in the registry (broken, or their profile or bus is): a rule file naming
    #: their points is not checked against them
    unchecked: set[str] = set(broken.get("devices", set()))
    search = _profile_paths(path, config)
    profiles: dict[str, StrictModel] = {}
    #: a profile is loaded once however many devices use it (and its errors are reported once)
    loaded: dict[tuple[str, type[StrictModel]], StrictModel | ConfigError] = {}
    registry = PointRegistry()
    seen_devices: set[str] = set()
    account_devices = _account_devices(config)
    for position, device in enumerate(config.devices):
        loc: Loc = ("devices", place("devices", position))
        if device.id in seen_devices:
            continue  # reported by _duplicate_ids
        seen_devices.add(device.id)
        unchecked.add(device.id)  # until its points are in the registry
        if isinstance(device, ModbusDeviceConfig) and device.bus not in bus_ids:
            errors.append(
                smap.diagnostic((*loc, "bus"), f"device {device.id!r} names unknown Modbus bus {device.bus!r}")
            )
            continue
        if isinstance(device, MqttDeviceConfig) and device.source not in source_ids:
            errors.append(
                smap.diagnostic((*loc, "source"), f"device {device.id!r} names unknown MQTT source {device.source!r}")
            )
            continue
        if isinstance(device, BacnetDeviceConfig) and device.network not in network_ids:
            errors.append(
                smap.diagnostic(
                    (*loc, "network"), f"device {device.id!r} names unknown BACnet network {device.network!r}"
                )
            )
            continue
        profile: StrictModel | None = None
        profile_model = type(device).profile_model
        if profile_model is not None:
            name = getattr(device, "profile", "")
            key = (name, profile_model)
            if key not in loaded:
                try:
                    loaded[key] = load_profile(name, profile_model, search)
                except FileNotFoundError:
                    if "profile_dirs" in broken:
                        continue  # looked up without the profile_dirs that are broken (and reported): not its fault
                    where = ", ".join(str(d) for d in search)
                    errors.append(
                        smap.diagnostic((*loc, "profile"), f"device profile {name!r} not found (looked in {where})")
                    )
                    continue
                except ConfigError as exc:
                    loaded[key] = exc
                    errors.extend(exc.diagnostics)
            cached = loaded[key]
            if isinstance(cached, ConfigError):
                continue
            profile = cached
            profiles[device.id] = profile
        if device.id in account_devices:
            errors.extend(_unpersonalised(device, account_devices[device.id], smap, loc))
        try:
            infos: list[PointInfo] = device.point_infos(profile)  # type: ignore[arg-type]
            if device.id in account_devices:
                infos = [replace(info, personal=True) for info in infos]
            for info in infos:
                registry.add(info)
            unchecked.discard(device.id)
        except (DuplicatePoint, ValueError) as exc:
            errors.append(smap.diagnostic(loc, str(exc)))

    errors.extend(_mqtt_binding_errors(config, smap, place))
    if config.privacy.building_aggregate is not None:
        aggregate, problems = _building_aggregate(
            config, config.privacy.building_aggregate, registry, smap, frozenset(unchecked)
        )
        errors.extend(problems)
        if aggregate is not None:
            registry.add(aggregate)

    rule_files: list[Path] = []
    for position, rule_path in enumerate(config.rules):
        resolved = (path.parent / rule_path).resolve()
        if not resolved.is_file():
            errors.append(smap.diagnostic(("rules", place("rules", position)), f"rule file not found: {resolved}"))
        rule_files.append(resolved)

    if errors:
        aggregate_config = config.privacy.building_aggregate
        if aggregate_config is not None and aggregate_config.point not in registry:
            unchecked.add(aggregate_config.point.partition(".")[0])
        partial = PartialSite(
            rule_files=tuple(f for f in rule_files if f.is_file()),
            registry=registry,
            timezone=config.gateway.timezone,
            unchecked_devices=frozenset(unchecked),
        )
        raise SiteError(errors, partial)
    return Site(path, config, profiles, registry, tuple(rule_files), smap, tuple(literal_secrets(config, smap)))
