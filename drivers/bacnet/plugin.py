"""The BACnet/IP driver's plugin (entry point ``bacnet`` in ``edge_gateway.drivers``): what the gateway's registry
knows of it. Imports the config models only; bacpypes3 is imported by ``build_sources``, when a site uses the
driver, and by the ``bacnet`` sub-commands."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from drivers.bacnet.config import BacnetDeviceConfig, BacnetNetworkConfig, BacnetProfile
from gateway.config.types import StrictModel
from gateway.plugins import DeviceEntry, DriverPlugin, SiteSection

if TYPE_CHECKING:
    from gateway.config.site import Site
    from gateway.driver_api import Source
    from gateway.errors import Diagnostic
    from gateway.registry import PointInfo


def _device(device: DeviceEntry) -> BacnetDeviceConfig:
    assert isinstance(device, BacnetDeviceConfig), "the registry hands a plugin only its own devices"
    return device


class BacnetPlugin(DriverPlugin):
    name = "bacnet"
    device_model = BacnetDeviceConfig
    sections = (
        SiteSection(key="bacnet_networks", model=BacnetNetworkConfig, what="BACnet network", device_field="network"),
    )
    profile_model = BacnetProfile
    cli = "drivers.bacnet.cli"

    def profile_name(self, device: DeviceEntry) -> str:
        return _device(device).profile

    def points(self, device: DeviceEntry, profile: StrictModel | None) -> list[PointInfo]:
        assert isinstance(profile, BacnetProfile)
        return _device(device).point_infos(profile)

    def references(self, device: DeviceEntry) -> Mapping[str, str]:
        return {"bacnet_networks": _device(device).network}

    def build_sources(self, site: Site) -> Sequence[Source]:
        from drivers.bacnet.source import build_sources

        return build_sources(site)

    def preflight(self, site: Site) -> list[Diagnostic]:
        """Each network's local address must be one of this host's: bacpypes3 would otherwise retry the bind
        forever in the background while ``check`` said the site was fine."""
        import errno
        import ipaddress
        import socket

        problems: list[Diagnostic] = []
        for index, network in enumerate(site.config.section("bacnet_networks", BacnetNetworkConfig)):
            ip = str(ipaddress.ip_interface(network.address).ip)
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.bind((ip, 0))  # port 0: the address is what is checked, not whether a stack holds the port
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    message = (
                        f"BACnet network {network.id!r}: {ip} is not an address of this host; give the address of "
                        "the interface on the BACnet network (`ip -4 addr` lists them)"
                    )
                else:
                    message = f"BACnet network {network.id!r}: cannot use {ip}: {exc.strerror or exc}"
                problems.append(site.diagnostic(("bacnet_networks", index, "address"), message))
            finally:
                probe.close()
        return problems


plugin = BacnetPlugin()
