"""The Modbus driver's plugin (entry point ``modbus`` in ``edge_gateway.drivers``): what the gateway's registry knows
of it. Imports the config models only; pymodbus is imported by ``build_sources``, when a site uses the driver."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig, ModbusProfile
from gateway.config.types import StrictModel
from gateway.plugins import DeviceEntry, DriverPlugin, SiteSection

if TYPE_CHECKING:
    from gateway.config.site import Site
    from gateway.driver_api import Source
    from gateway.registry import PointInfo


def _device(device: DeviceEntry) -> ModbusDeviceConfig:
    assert isinstance(device, ModbusDeviceConfig), "the registry hands a plugin only its own devices"
    return device


class ModbusPlugin(DriverPlugin):
    name = "modbus"
    device_model = ModbusDeviceConfig
    sections = (SiteSection(key="modbus_buses", model=ModbusBusConfig, what="Modbus bus", device_field="bus"),)
    profile_model = ModbusProfile
    cli = "drivers.modbus.cli"

    def profile_name(self, device: DeviceEntry) -> str:
        return _device(device).profile

    def points(self, device: DeviceEntry, profile: StrictModel | None) -> list[PointInfo]:
        assert isinstance(profile, ModbusProfile)
        return _device(device).point_infos(profile)

    def references(self, device: DeviceEntry) -> Mapping[str, str]:
        return {"modbus_buses": _device(device).bus}

    def build_sources(self, site: Site) -> Sequence[Source]:
        from drivers.modbus.source import build_sources

        return build_sources(site)


plugin = ModbusPlugin()
