"""The site file: what a gateway is, what it reads, where it sends data, which rules it runs.

``load_site(path)`` returns a fully resolved ``Site`` (config, device profiles, point registry, rule file paths) or
raises ``ConfigError`` listing every problem found as ``file:line:col: message``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, ValidationError, create_model
from pydantic_core import PydanticCustomError

from gateway.config.site_types import (
    BuildingAggregateConfig,
    DeviceEntry,
    GatewayIdentity,
    HttpConfig,
    PrivacyConfig,
    Site,
    SiteConfig,
    StorageConfig,
)
from gateway.config.source import Loc, SourceMap, load_yaml, validate
from gateway.config.types import LiteralSecret, StrictModel, parse_size
from gateway.errors import ConfigError, Diagnostic
from gateway.incentives.config import IncentivesConfig
from gateway.plugins import DriverPlugin, drivers_named, find_driver, plugins, unknown_driver_message
from gateway.registry import DuplicatePoint, PointInfo, PointRegistry
from gateway.uplinks.config import UplinksConfig

# parse_size is re-exported: driver configs parse sizes with the same rules; the site's types (gateway/config/
# site_types.py) are re-exported for the callers that load a site and read it
__all__ = [
    "FIRMWARE_CONFIGS",
    "BuildingAggregateConfig",
    "Site",
    "SiteConfig",
    "aggregate_meters",
    "load_profile",
    "load_site",
    "parse_size",
    "site_drivers",
    "site_model",
]

#: the repository's firmware_configs/ (device profiles, demo site, rule files)
FIRMWARE_CONFIGS = Path(
    os.environ.get("EDGE_GATEWAY_CONFIGS", Path(__file__).resolve().parents[2] / "firmware_configs")
)


def _known_driver(value: object) -> object:
    """An unknown (or missing) ``driver:`` is one clear message listing the installed drivers, instead of pydantic's
    union-tag error."""
    if not isinstance(value, dict):
        # what the devices union answers, also when the schema holds one driver's model (a site using one driver)
        raise PydanticCustomError(
            "model_attributes_type", "Input should be a valid dictionary or object to extract fields from"
        )
    name = value.get("driver")
    if name is None:
        installed = ", ".join(sorted(plugins().drivers)) or "none"
        raise ValueError(f"missing required key 'driver' (installed drivers: {installed})")
    if not isinstance(name, str) or find_driver(name) is None:
        raise ValueError(unknown_driver_message(str(name)))
    return value


@cache
def uplinks_model() -> type[UplinksConfig]:
    """``UplinksConfig`` with one optional field per installed uplink plugin."""
    fields: dict[str, Any] = {name: (plugin.config_model | None, None) for name, plugin in plugins().uplinks.items()}
    model: type[UplinksConfig] = create_model("UplinksConfig", __base__=UplinksConfig, **fields)
    return model


#: the top-level keys of a site file whichever drivers it uses (the fixed fields of ``site_model``)
_CORE_KEYS = frozenset(
    {"version", "gateway", "storage", "http", "devices", "uplinks", "rules", "incentives", "privacy", "profile_dirs"}
)


def site_drivers(data: object) -> dict[str, DriverPlugin]:
    """The drivers a site file's schema is assembled from: the ones its devices name, so a site does not import the
    config models of drivers it does not use (issue 13, item 8).

    A top-level key that is neither a core key nor a section of those drivers (the section of a driver no device
    uses yet, or a typo) brings in every installed driver: the key is then validated, or refused with its "did you
    mean", exactly as by the schema of every driver. So is a file that is not a mapping."""
    if not isinstance(data, dict):
        return dict(plugins().drivers)
    devices = data.get("devices")
    entries = devices if isinstance(devices, list) else []
    named = drivers_named(e["driver"] for e in entries if isinstance(e, dict) and isinstance(e.get("driver"), str))
    sections = {section.key for plugin in named.values() for section in plugin.sections}
    if any(key not in _CORE_KEYS and key not in sections for key in data):
        return dict(plugins().drivers)
    return named


def site_model(drivers: Iterable[str] | None = None) -> type[SiteConfig]:
    """``SiteConfig`` assembled from the plugins of ``drivers`` (default: every installed driver) and every uplink
    plugin; the field order is the documented order of a site file."""
    return _site_model(tuple(sorted(plugins().drivers if drivers is None else set(drivers))))


@cache
def _site_model(drivers: tuple[str, ...]) -> type[SiteConfig]:
    plugins_used = drivers_named(drivers)
    models = tuple(plugin.device_model for plugin in plugins_used.values())
    device: Any
    if not models:
        device = Annotated[dict[str, object], BeforeValidator(_known_driver)]
    elif len(models) == 1:
        device = Annotated[models[0], BeforeValidator(_known_driver)]
    else:
        device = Annotated[Union[models], Field(discriminator="driver"), BeforeValidator(_known_driver)]  # noqa: UP007
    fields: dict[str, Any] = {
        "version": (Literal[1], ...),
        "gateway": (GatewayIdentity, ...),
        "storage": (StorageConfig, StorageConfig()),
        "http": (HttpConfig, HttpConfig()),
    }
    for plugin in plugins_used.values():
        for section in plugin.sections:
            fields[section.key] = (list[section.model], Field(default_factory=list))  # type: ignore[name-defined]
    uplinks = uplinks_model()
    fields |= {
        "devices": (list[device], Field(default_factory=list)),
        "uplinks": (uplinks, Field(default_factory=uplinks)),
        "rules": (list[str], Field(default_factory=list)),
        "incentives": (IncentivesConfig | None, None),
        "privacy": (PrivacyConfig, PrivacyConfig()),
        #: where device profiles are looked up, relative to the site file; the bundled profiles are searched last
        "profile_dirs": (list[str], Field(default_factory=lambda: ["../devices"])),
    }
    model: type[SiteConfig] = create_model("SiteConfig", __base__=SiteConfig, **fields)
    return model


def _sections(drivers: Mapping[str, DriverPlugin]) -> list[tuple[DriverPlugin, str, str, str | None]]:
    """(plugin, key, what, device_field) of every section of the site's drivers."""
    return [
        (plugin, section.key, section.what, section.device_field)
        for plugin in drivers.values()
        for section in plugin.sections
    ]


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


def _duplicate_ids(
    config: SiteConfig, smap: SourceMap, place: Callable[[str, int], int], drivers: Mapping[str, DriverPlugin]
) -> list[Diagnostic]:
    """Duplicate ids are errors (not last-one-wins), positioned at the second occurrence."""
    errors: list[Diagnostic] = []
    tables = [("devices", "device", [d.id for d in config.devices])]
    tables += [(key, what, config.section_ids(key)) for _plugin, key, what, _field in _sections(drivers)]
    for key, what, ids in tables:
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


def _plugin_site_errors(
    config: SiteConfig, smap: SourceMap, place: Callable[[str, int], int], drivers: Mapping[str, DriverPlugin]
) -> list[Diagnostic]:
    """Each driver's whole-site checks (MQTT: subscriptions named, one device per topic level), for the drivers
    the site uses."""
    used = {device.driver for device in config.devices}
    errors: list[Diagnostic] = []
    for name, plugin in drivers.items():
        if name in used or any(config.section_ids(section.key) for section in plugin.sections):
            errors.extend(plugin.check_site(config, smap, place))
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


def _unpersonalised(
    device: DeviceEntry, plugin: DriverPlugin, meter: str, smap: SourceMap, loc: Loc
) -> list[Diagnostic]:
    """An explicit ``personal: false`` on a device holding an account meter (or on one of its points) is an error:
    it cannot take effect, and silently ignoring it would let the file say the opposite of what the gateway does."""
    found: list[Loc] = []
    if isinstance(device, StrictModel) and "personal" in device.model_fields_set and not device.personal:
        found.append((*loc, "personal"))
    found.extend((*loc, *inner) for inner in plugin.personal_overrides(device))
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


def _unknown_reference(  # noqa: PLR0917 (a private helper of load_site, called once)
    device: DeviceEntry,
    plugin: DriverPlugin,
    section_ids: Mapping[str, set[str]],
    section_names: Mapping[str, tuple[str, str | None]],
    smap: SourceMap,
    loc: Loc,
) -> Diagnostic | None:
    """A device that names a section entry (its Modbus bus, its MQTT source) the file does not define."""
    for key, ident in plugin.references(device).items():
        if ident in section_ids.get(key, set()):
            continue
        what, device_field = section_names.get(key, (key, None))
        where: Loc = (*loc, device_field) if device_field is not None else loc
        return smap.diagnostic(where, f"device {device.id!r} names unknown {what} {ident!r}")
    return None


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


def _item_sections(drivers: Mapping[str, DriverPlugin]) -> tuple[str, ...]:
    """Sections checked item by item (one bad device must not take the others with it)."""
    keys = [section.key for plugin in drivers.values() for section in plugin.sections]
    return (*keys, "devices", "rules", "profile_dirs")


@dataclass
class _Salvage:
    """A site that failed validation, with what did validate: a broken item or section is left out (its errors are
    already reported) and the ids it held remembered, so nothing that names it is blamed for it."""

    config: SiteConfig
    #: section -> the file index of each kept item (kept items keep their positions in messages)
    index: dict[str, list[int]]
    #: section -> the ids (and any other text) the broken items held; a section is a key here when any of it broke
    broken: dict[str, set[str]]


def _valid_alone(model: type[SiteConfig], section: dict[str, object], context: object) -> bool:
    try:
        model.model_validate({**_STUB_SITE, **section}, context=context)
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


def _salvage(data: object, context: object, drivers: Mapping[str, DriverPlugin]) -> _Salvage | None:
    """The parts of a site file that validate on their own, validated together; None when even that fails."""
    if not isinstance(data, dict):
        return None
    kept: dict[str, object] = dict(_STUB_SITE)
    index: dict[str, list[int]] = {}
    broken: dict[str, set[str]] = {}
    model = site_model(drivers)
    item_sections = _item_sections(drivers)
    for key, value in data.items():
        if key not in model.model_fields:
            continue  # an unknown key: reported, and nothing to keep
        if key in item_sections and isinstance(value, list):
            items = [(i, item) for i, item in enumerate(value) if _valid_alone(model, {key: [item]}, context)]
            good = {i for i, _ in items}
            if len(good) < len(value):
                broken.setdefault(key, set())
            for i, item in enumerate(value):
                if i not in good and isinstance(item, dict) and isinstance(item.get("id"), str):
                    broken.setdefault(key, set()).add(item["id"])
            kept[key] = [item for _, item in items]
            index[key] = [i for i, _ in items]
        elif _valid_alone(model, {key: value}, context):
            kept[key] = value
        else:
            broken.setdefault(key, set()).update(_texts(value))  # version and gateway keep the stub's
    try:
        config = model.model_validate(kept, context=context)
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
    drivers = site_drivers(data)
    salvage: _Salvage | None = None
    try:
        config = validate(site_model(drivers), data, smap, context=context)
    except ConfigError as exc:
        # every problem of the file is reported; the devices, buses and sections that did validate are still
        # checked (profiles, ids, rule files), so one bad device does not hide the next one's missing profile
        recovered.extend(exc.diagnostics)
        salvage = _salvage(data, context, drivers)
        if salvage is None:
            raise ConfigError(recovered) from None
        config = salvage.config
    index: dict[str, list[int]] = salvage.index if salvage is not None else {}
    broken: dict[str, set[str]] = salvage.broken if salvage is not None else {}

    def place(section: str, position: int) -> int:
        """The item's index in the file (items before it may have been left out as broken)."""
        return index[section][position] if section in index else position

    errors: list[Diagnostic] = [*recovered, *_duplicate_ids(config, smap, place, drivers)]
    # a device on a bus (or source) that is itself broken is not blamed for it; the device is still checked
    section_ids = {key: {*config.section_ids(key), *broken.get(key, set())} for _p, key, _w, _f in _sections(drivers)}
    section_names = {key: (what, device_field) for _p, key, what, device_field in _sections(drivers)}
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
        plugin = drivers[device.driver]  # the union admits only the drivers the devices name
        unknown = _unknown_reference(device, plugin, section_ids, section_names, smap, loc)
        if unknown is not None:
            errors.append(unknown)
            continue
        profile: StrictModel | None = None
        profile_model = plugin.profile_model
        if profile_model is not None:
            name = plugin.profile_name(device)
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
            errors.extend(_unpersonalised(device, plugin, account_devices[device.id], smap, loc))
        try:
            infos: list[PointInfo] = plugin.points(device, profile)
            if device.id in account_devices:
                infos = [replace(info, personal=True) for info in infos]
            for info in infos:
                registry.add(info)
            unchecked.discard(device.id)
        except (DuplicatePoint, ValueError) as exc:
            errors.append(smap.diagnostic(loc, str(exc)))

    errors.extend(_plugin_site_errors(config, smap, place, drivers))
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
