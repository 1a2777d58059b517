"""Which points are personal: ``personal: true`` on a point or a device of every driver, every device holding an
incentive account's meter, and nothing else (docs/privacy.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.site import load_site
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MQTT_SOURCE = "mqtt_sources: [{id: b, host: 127.0.0.1, subscriptions: [{id: z, topic: z2m/+, decoder: {type: json}}]}]"


def _site(tmp_path: Path, body: str) -> Path:
    (tmp_path / "devices").mkdir(exist_ok=True)
    path = tmp_path / "sites" / "site.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text("version: 1\ngateway: {id: gw1, site: tower}\n" + body)
    return path


def test_every_point_of_a_device_holding_an_account_meter_is_personal() -> None:
    registry = load_site(REPO / "firmware_configs" / "sites" / "demo.yaml").registry
    personal = {point for point, info in registry.items() if info.personal}
    assert personal == {f"{apt}.{name}" for apt in ("apt101", "apt102", "apt201")
                        for name in ("power_kw", "energy_kwh", "voltage", "current", "pf")}  # fmt: skip
    assert not registry["main_meter.energy_kwh"].personal  # the same profile, not an account: building data


def test_personal_on_simulator_profile_points_and_devices(tmp_path: Path) -> None:
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "flat-zone.yaml").write_text(
        "driver: simulator\nmodel: zone\npoints:\n"
        "  temperature: {unit: degC}\n  co2: {unit: ppm}\n"
        "  occupancy: {kind: int, personal: true}\n  humidity: {unit: '%'}\n"
    )
    site = load_site(_site(tmp_path, (
        "devices:\n"
        "  - {id: flat1, driver: simulator, profile: flat-zone}\n"
        "  - {id: flat2, driver: simulator, profile: sim-zone, personal: true}\n"
    )))  # fmt: skip
    personal = {point for point, info in site.registry.items() if info.personal}
    assert personal == {"flat1.occupancy"} | {f"flat2.{n}" for n in ("temperature", "co2", "occupancy", "humidity")}


def test_personal_on_modbus_profile_points_and_devices(tmp_path: Path) -> None:
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "flat-meter.yaml").write_text(
        "driver: modbus\nvendor: Acme\nmodel: F1\ndoc: Acme F1 register map, rev 1\npoints:\n"
        "  kwh: {table: input, address: 0, type: f32, unit: kWh, personal: true}\n"
        "  hz: {table: input, address: 2, type: f32, unit: Hz}\n"
    )
    site = load_site(_site(tmp_path, (
        "modbus_buses: [{id: b1, type: tcp, host: 127.0.0.1}]\n"
        "devices:\n"
        "  - {id: m1, driver: modbus, profile: flat-meter, bus: b1, unit: 1}\n"
        "  - {id: m2, driver: modbus, profile: eastron-sdm120, bus: b1, unit: 2, personal: true}\n"
    )))  # fmt: skip
    assert site.registry["m1.kwh"].personal and not site.registry["m1.hz"].personal
    assert all(site.registry[p].personal for p in site.registry.points_of("m2"))


def test_personal_on_mqtt_points_and_devices(tmp_path: Path) -> None:
    site = load_site(_site(tmp_path, (
        f"{MQTT_SOURCE}\n"
        "devices:\n"
        "  - {id: plug, driver: mqtt, source: b, points: {energy_kwh: {unit: kWh, personal: true}, linkquality: {}}}\n"
        "  - {id: tv, driver: mqtt, source: b, personal: true, points: {power_w: {unit: W}}}\n"
    )))  # fmt: skip
    assert site.registry["plug.energy_kwh"].personal and not site.registry["plug.linkquality"].personal
    assert site.registry["tv.power_w"].personal


def test_an_mqtt_account_meter_cannot_be_declared_not_personal(tmp_path: Path) -> None:
    path = _site(tmp_path, (
        f"{MQTT_SOURCE}\n"
        "devices:\n"
        "  - id: plug\n    driver: mqtt\n    source: b\n    points:\n"
        "      energy_kwh: {unit: kWh, personal: false}\n"
        "incentives:\n"
        "  baseline: {method: fixed, kwh: 0.5}\n  emission_factor: {kg_per_kwh: 0.5}\n"
        "  signing_key_file: k.pem\n  pseudonym_key_file: p.key\n"
        "  accounts: [{id: A1, meters: [plug.energy_kwh]}]\n"
    ))  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_site(path)
    [diagnostic] = info.value.diagnostics
    assert (diagnostic.line, diagnostic.col) == (9, 41)  # at "false"
    assert "holds the account meter plug.energy_kwh" in diagnostic.message
