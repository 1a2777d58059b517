"""Driver and uplink plugins: the registry the site schema, ``check``, the supervisor and the CLI are assembled from.

A protocol is a plugin, the built-in ones included. A driver package registers one object in the
``edge_gateway.drivers`` entry-point group, an uplink in ``edge_gateway.uplinks``; pyproject.toml lists the built-in
ones the same way a separate package would::

    [project.entry-points."edge_gateway.drivers"]
    bacnet = "drivers.bacnet.plugin:plugin"

The entry-point name is the value of ``driver:`` in a site file (for an uplink: its key under ``uplinks:``) and must
equal the plugin's ``name``. Adding a driver is a new folder plus that one line: nothing in ``gateway/`` names it.

A driver plugin is a ``DriverPlugin`` subclass instance. It declares:

- ``name`` and ``device_model``: the pydantic model of one ``devices:`` entry (a ``StrictModel`` with
  ``id: Ident``, ``driver: Literal["<name>"]`` and ``personal: bool = False``); the site's device list is the
  union of every plugin's model, discriminated by ``driver:``;
- ``sections``: top-level keys the driver adds to a site file (``modbus_buses:``), each a list of entries with an
  ``id``; duplicate ids are refused, and ``SiteSection.device_field`` names the device key that must name one of
  them (``bus:``);
- ``profile_model`` and ``profile_name(device)`` when its devices use a profile from ``firmware_configs/devices/``;
- ``points(device, profile)``: the device's points for the point registry;
- ``references(device)``: which section entry a device names (section key -> id);
- ``build_sources(site)``: the sources the supervisor runs (import the protocol library *here*, not at module level);
- optionally ``check_site`` (whole-site checks at load), ``personal_overrides``, ``preflight`` (what ``check``
  reports and ``run`` refuses, without connecting) and ``cli``: a module with ``register(subparsers)``.

An uplink plugin (``UplinkPlugin``) declares ``name``, ``config_model`` and ``build(config, context)`` returning the
runner the supervisor runs (a ``gateway.status.UplinkRunnerPart``, normally ``gateway.uplinks.runner.UplinkRunner``
around the plugin's ``Uplink``), and optionally ``preflight``. docs/architecture.md walks through adding either.

A plugin module may import its config models (pydantic, nothing else), never a protocol library. It is imported
only when asked for: the site loader and the supervisor ask for the drivers a site file names (``drivers_named``),
so a Modbus-only site never imports the BACnet or MQTT config models; ``--help`` and ``check`` load every plugin
(``plugins()``), ``check`` to report one that cannot be loaded. Plugins are listed sorted by name, so the order of
sections, sub-commands and sources does not depend on the order pip installed the packages in.

Must never import a protocol library, the supervisor or the site loader at module level.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar

from gateway.config.site_types import DeviceEntry
from gateway.config.types import StrictModel
from gateway.errors import ConfigError, Diagnostic

if TYPE_CHECKING:
    from gateway.config.site_types import Site, SiteConfig
    from gateway.config.source import SourceMap
    from gateway.driver_api import Source
    from gateway.model import Command
    from gateway.outbox import Outbox
    from gateway.registry import PointInfo
    from gateway.status import UplinkRunnerPart

# DeviceEntry lives with the site's types (gateway/config/site_types.py); a plugin imports it from here
__all__ = [
    "DRIVER_GROUP",
    "UPLINK_GROUP",
    "DeviceEntry",
    "DriverPlugin",
    "Placer",
    "Plugins",
    "SiteSection",
    "UplinkContext",
    "UplinkPlugin",
    "driver",
    "drivers_named",
    "find_driver",
    "plugins",
    "unknown_driver_message",
]

log = logging.getLogger(__name__)

DRIVER_GROUP = "edge_gateway.drivers"
UPLINK_GROUP = "edge_gateway.uplinks"

#: the position of a section's item in the file: items before it may have been left out as broken (site.py)
Placer = Callable[[str, int], int]


@dataclass(frozen=True, kw_only=True)
class SiteSection:
    """A top-level list a driver adds to the site file, e.g. ``modbus_buses:``."""

    key: str
    #: one entry of the list; it has an ``id`` field
    model: type[StrictModel]
    #: what one entry is called in messages ("Modbus bus")
    what: str
    #: the device key that names an entry of this section (``bus``), if devices name one
    device_field: str | None = None


class DriverPlugin:
    """A driver: subclass it, set the class attributes, override what the driver needs; register an instance."""

    name: ClassVar[str]
    device_model: ClassVar[type[StrictModel]]
    sections: ClassVar[tuple[SiteSection, ...]] = ()
    profile_model: ClassVar[type[StrictModel] | None] = None
    #: a module with ``register(subparsers) -> None`` adding the driver's sub-commands, imported for the CLI only
    cli: ClassVar[str | None] = None

    def profile_name(self, device: DeviceEntry) -> str:
        """The profile a device uses (only asked when ``profile_model`` is set)."""
        raise NotImplementedError(f"driver {self.name!r} has a profile_model but no profile_name")

    def points(self, device: DeviceEntry, profile: StrictModel | None) -> list[PointInfo]:
        """The device's points (raise ValueError for a problem the file must fix)."""
        raise NotImplementedError(f"driver {self.name!r} does not list its points")

    def references(self, device: DeviceEntry) -> Mapping[str, str]:
        """Section key -> the id of the entry this device names (``{"modbus_buses": "rs485_1"}``)."""
        return {}

    def personal_overrides(self, device: DeviceEntry) -> list[tuple[str | int, ...]]:
        """Places inside the device entry that say ``personal: false`` explicitly (refused on an account meter's
        device); the device-level key is checked by the loader."""
        return []

    def check_site(self, config: SiteConfig, smap: SourceMap, place: Placer) -> list[Diagnostic]:
        """Whole-site checks at load (bindings between sections and devices)."""
        return []

    def build_sources(self, site: Site) -> Sequence[Source]:
        """The sources this driver runs for ``site``; builds objects only, opens nothing. Raises ConfigError."""
        raise NotImplementedError(f"driver {self.name!r} builds no sources")

    def preflight(self, site: Site) -> list[Diagnostic]:
        """What ``run`` would refuse at start (TLS files that do not load, ...), found without connecting."""
        return []


@dataclass(frozen=True, kw_only=True)
class UplinkContext:
    """What an uplink's runner is built with besides its config."""

    site: Site
    outbox: Outbox
    #: the supervisor's command path (allowlist, then the owning driver)
    commands: Callable[[Command], Awaitable[None]]
    data_dir: Path | None = None
    time_ns: Callable[[], int] | None = None


class UplinkPlugin:
    """An uplink: subclass it, set ``name`` (its key under ``uplinks:``) and ``config_model``; register an
    instance."""

    name: ClassVar[str]
    config_model: ClassVar[type[StrictModel]]

    def build(self, config: StrictModel, context: UplinkContext) -> UplinkRunnerPart:
        """The runner for this uplink. Import the protocol library here."""
        raise NotImplementedError(f"uplink {self.name!r} builds nothing")

    def preflight(self, site: Site, config: StrictModel) -> list[Diagnostic]:
        """What ``run`` would refuse at start, found without connecting."""
        return []


_P = TypeVar("_P", DriverPlugin, UplinkPlugin)

#: (group, name) -> the plugin loaded, or None when it cannot be (then ``_broken`` says why)
_loaded: dict[tuple[str, str], DriverPlugin | UplinkPlugin | None] = {}
#: entry points that could not be loaded: name -> why (reported by ``check``, not fatal for other sites)
_broken: dict[str, str] = {}


@cache
def _entry_points(group: str) -> Mapping[str, EntryPoint]:
    """The group's entry points by name, sorted; reading them imports no plugin (they are package metadata)."""
    found: dict[str, EntryPoint] = {}
    for point in sorted(entry_points(group=group), key=lambda p: p.name):
        # the same distribution seen twice on sys.path (an editable install beside a build): first wins
        found.setdefault(point.name, point)
    return found


def _load(group: str, name: str, kind: type[_P]) -> _P | None:
    """The plugin registered as ``name``, imported at the first ask (once per process); None when there is none or
    it cannot be loaded."""
    key = (group, name)
    if key not in _loaded:
        _loaded[key] = _import(group, name, kind)
    plugin = _loaded[key]
    return plugin if isinstance(plugin, kind) else None


def _import(group: str, name: str, kind: type[_P]) -> _P | None:
    point = _entry_points(group).get(name)
    if point is None:
        return None
    try:
        plugin = point.load()
    except Exception as exc:  # a broken third-party plugin must not stop a site that does not use it
        _broken[name] = f"{point.value}: {type(exc).__name__}: {exc}"
        log.warning("plugin %s (%s) cannot be loaded: %s", name, group, exc)
        return None
    if not isinstance(plugin, kind) or plugin.name != name:
        _broken[name] = f"{point.value} is not a {kind.__name__} named {name!r}"
        log.warning("plugin %s (%s): %s", name, group, _broken[name])
        return None
    return plugin


def find_driver(name: str) -> DriverPlugin | None:
    """The plugin of ``driver: name``, importing that plugin (and its config models) only; None when it is not
    installed or cannot be loaded."""
    return _load(DRIVER_GROUP, name, DriverPlugin)


def drivers_named(names: Iterable[str]) -> dict[str, DriverPlugin]:
    """The plugins of the drivers named that can be loaded, sorted by name; no other driver is imported."""
    found = {name: find_driver(name) for name in sorted(set(names))}
    return {name: plugin for name, plugin in found.items() if plugin is not None}


class Plugins:
    """Every installed plugin, sorted by name. Each group is loaded at its first use: ``uplinks`` imports no driver.
    A site's loader and supervisor ask for the drivers it names (``drivers_named``), not for ``drivers``."""

    @cached_property
    def drivers(self) -> Mapping[str, DriverPlugin]:
        return drivers_named(_entry_points(DRIVER_GROUP))

    @cached_property
    def uplinks(self) -> Mapping[str, UplinkPlugin]:
        found = {name: _load(UPLINK_GROUP, name, UplinkPlugin) for name in _entry_points(UPLINK_GROUP)}
        return {name: plugin for name, plugin in found.items() if plugin is not None}

    @property
    def broken(self) -> Mapping[str, str]:
        """Entry points that could not be loaded: name -> why (loads every plugin to know)."""
        _ = self.drivers, self.uplinks
        return dict(_broken)


@cache
def plugins() -> Plugins:
    """The registry of every installed driver and uplink plugin (one per process)."""
    return Plugins()


def driver(name: str) -> DriverPlugin:
    """The plugin of ``driver: name``; ConfigError naming the installed drivers when there is none."""
    found = find_driver(name)
    if found is None:
        raise ConfigError([Diagnostic("", 0, 0, unknown_driver_message(name))])
    return found


def unknown_driver_message(name: str) -> str:
    from gateway.config.source import did_you_mean

    installed = sorted(plugins().drivers)
    if name in _broken:
        return f"driver {name!r} is installed but cannot be loaded ({_broken[name]}); installed drivers: " + (
            ", ".join(installed) or "none"
        )
    if not installed:
        return (
            f"unknown driver {name!r}: no driver is installed (the edge-gateway package's entry points are missing: "
            "reinstall it, e.g. pip install -e .)"
        )
    return f"unknown driver {name!r}{did_you_mean(name, installed)}; installed drivers: {', '.join(installed)}"
