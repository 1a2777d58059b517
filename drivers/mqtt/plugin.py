"""The MQTT sensor driver's plugin (entry point ``mqtt`` in ``edge_gateway.drivers``). Imports the config models
only; paho and aiomqtt are imported by ``build_sources`` (and the TLS check), when a site uses the driver."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from drivers.mqtt.config import MqttDeviceConfig, MqttSourceConfig, check_bindings
from gateway.config.types import StrictModel
from gateway.plugins import DeviceEntry, DriverPlugin, Placer, SiteSection

if TYPE_CHECKING:
    from gateway.config.site import Site, SiteConfig
    from gateway.config.source import SourceMap
    from gateway.driver_api import Source
    from gateway.errors import Diagnostic
    from gateway.registry import PointInfo


def _device(device: DeviceEntry) -> MqttDeviceConfig:
    assert isinstance(device, MqttDeviceConfig), "the registry hands a plugin only its own devices"
    return device


class MqttPlugin(DriverPlugin):
    name = "mqtt"
    device_model = MqttDeviceConfig
    sections = (SiteSection(key="mqtt_sources", model=MqttSourceConfig, what="MQTT source", device_field="source"),)
    cli = "drivers.mqtt.cli"

    def points(self, device: DeviceEntry, profile: StrictModel | None) -> list[PointInfo]:
        return _device(device).point_infos(profile)

    def references(self, device: DeviceEntry) -> Mapping[str, str]:
        return {"mqtt_sources": _device(device).source}

    def personal_overrides(self, device: DeviceEntry) -> list[tuple[str | int, ...]]:
        return [
            ("points", name, "personal")
            for name, spec in _device(device).points.items()
            if "personal" in spec.model_fields_set and not spec.personal
        ]

    def check_site(self, config: SiteConfig, smap: SourceMap, place: Placer) -> list[Diagnostic]:
        """Subscriptions named, one device per topic level: positioned at the device that introduces each problem
        (devices are added one at a time and only the new problems are attributed to it)."""
        sources = config.section("mqtt_sources", MqttSourceConfig)
        if not sources:
            return []
        ids = {source.id for source in sources}
        errors: list[Diagnostic] = []
        known: set[str] = set()
        devices: list[MqttDeviceConfig] = []
        for index, device in enumerate(config.devices):
            if not isinstance(device, MqttDeviceConfig) or device.source not in ids:
                continue
            devices.append(device)
            for problem in check_bindings(sources, devices):
                if problem not in known:
                    known.add(problem)
                    errors.append(smap.diagnostic(("devices", place("devices", index)), problem))
        return errors

    def build_sources(self, site: Site) -> Sequence[Source]:
        from drivers.mqtt.source import build_sources

        return build_sources(site)

    def preflight(self, site: Site) -> list[Diagnostic]:
        """The brokers' TLS files: what each connection builds; a file it cannot load would crash the driver in a
        loop."""
        problems: list[Diagnostic] = []
        for index, source in enumerate(site.config.section("mqtt_sources", MqttSourceConfig)):
            if source.tls is None:
                continue
            import ssl

            from gateway.mqtt_connection import tls_context
            from gateway.preflight import tls_message

            try:
                tls_context(source.tls)
            except (OSError, ssl.SSLError, ValueError) as exc:
                problems.append(site.diagnostic(("mqtt_sources", index, "tls"), tls_message(source.tls.files(), exc)))
        return problems


plugin = MqttPlugin()
