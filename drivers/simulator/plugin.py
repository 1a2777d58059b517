"""The simulator's plugin (entry point ``simulator`` in ``edge_gateway.drivers``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from drivers.simulator.config import SimulatorDeviceConfig, SimulatorProfile
from gateway.config.types import StrictModel
from gateway.plugins import DeviceEntry, DriverPlugin

if TYPE_CHECKING:
    from gateway.config.site import Site
    from gateway.driver_api import Source
    from gateway.registry import PointInfo


def _device(device: DeviceEntry) -> SimulatorDeviceConfig:
    assert isinstance(device, SimulatorDeviceConfig), "the registry hands a plugin only its own devices"
    return device


class SimulatorPlugin(DriverPlugin):
    name = "simulator"
    device_model = SimulatorDeviceConfig
    profile_model = SimulatorProfile

    def profile_name(self, device: DeviceEntry) -> str:
        return _device(device).profile

    def points(self, device: DeviceEntry, profile: StrictModel | None) -> list[PointInfo]:
        assert isinstance(profile, SimulatorProfile)
        return _device(device).point_infos(profile)

    def build_sources(self, site: Site) -> Sequence[Source]:
        from drivers.simulator.source import build_sources

        return build_sources(site)


plugin = SimulatorPlugin()
