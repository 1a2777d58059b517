"""A device's PointInfo list from its profile: the same facts for every driver, one tags dict shared where a point
has no tags of its own."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from drivers.bacnet.config import BacnetDeviceConfig, BacnetProfile
from drivers.modbus.config import ModbusDeviceConfig, ModbusProfile
from drivers.simulator.config import SimulatorDeviceConfig, SimulatorProfile
from gateway.config.source import load_yaml, validate
from gateway.driver_api import device_breaker
from gateway.registry import PointInfo

DEVICES = Path(__file__).resolve().parents[2] / "firmware_configs" / "devices"


def _modbus_profile(tmp_path: Path) -> ModbusProfile:
    path = tmp_path / "acme-m1.yaml"
    path.write_text(
        "driver: modbus\nvendor: Acme\nmodel: M1\ndoc: Acme M1 manual rev 3, input registers\npoints:\n"
        "  power_kw: {table: input, address: 0, type: f32, unit: kW, max_power_kw: 40, description: total power}\n"
        "  flow: {table: input, address: 2, type: u16, unit: m3/h, tags: {circuit: c2, vendor: other}}\n"
        "  setpoint: {table: holding, address: 10, type: u16, writable: true, min: 5, max: 30, personal: true}\n"
    )
    data, smap = load_yaml(path)
    return validate(ModbusProfile, data, smap)


def test_modbus_points_carry_every_fact_of_their_spec(tmp_path: Path) -> None:
    profile = _modbus_profile(tmp_path)
    device = ModbusDeviceConfig(id="m1", driver="modbus", profile="acme-m1", bus="b", unit=1, tags={"floor": "2"})
    base = {"device": "m1", "vendor": "Acme", "model": "M1", "floor": "2"}
    assert device.point_infos(profile) == [
        PointInfo(
            id="m1.power_kw",
            unit="kW",
            kind="float",
            description="total power",
            max_power_kw=40.0,
            measurement=profile.measurement_name,
            tags=base,
        ),
        PointInfo(
            id="m1.flow",
            unit="m3/h",
            kind="int",
            measurement=profile.measurement_name,
            # the point's own tags win over the device's
            tags={**base, "circuit": "c2", "vendor": "other"},
        ),
        PointInfo(
            id="m1.setpoint",
            kind="int",
            writable=True,
            min=5.0,
            max=30.0,
            measurement=profile.measurement_name,
            tags=base,
            personal=True,
        ),
    ]


def test_points_without_tags_of_their_own_share_one_dict(tmp_path: Path) -> None:
    profile = _modbus_profile(tmp_path)
    device = ModbusDeviceConfig(id="m1", driver="modbus", profile="acme-m1", bus="b", unit=1, tags={"floor": "2"})
    power, flow, setpoint = device.point_infos(profile)
    assert power.tags is setpoint.tags
    assert flow.tags is not power.tags
    assert power.tags == {"device": "m1", "vendor": "Acme", "model": "M1", "floor": "2"}
    # the shared dict is built for the points, never the config's own: changing a config later cannot reach them
    assert power.tags is not device.tags
    assert device.tags == {"floor": "2"}


def test_a_personal_device_makes_every_point_personal(tmp_path: Path) -> None:
    profile = _modbus_profile(tmp_path)
    device = ModbusDeviceConfig(id="m1", driver="modbus", profile="acme-m1", bus="b", unit=1, personal=True)
    assert [info.personal for info in device.point_infos(profile)] == [True, True, True]
    device = ModbusDeviceConfig(id="m1", driver="modbus", profile="acme-m1", bus="b", unit=1)
    assert [info.personal for info in device.point_infos(profile)] == [False, False, True]


def test_bacnet_points_take_the_gateway_unit_and_no_rating() -> None:
    data, smap = load_yaml(DEVICES / "bacnet-kmc-simplyvav.yaml")
    profile = validate(BacnetProfile, data, smap)
    device = BacnetDeviceConfig(id="vav3", driver="bacnet", profile="bacnet-kmc-simplyvav", network="bms", instance=7)
    infos = device.point_infos(profile)
    assert [info.id for info in infos] == [f"vav3.{name}" for name in profile.points]
    for info, spec in zip(infos, profile.points.values(), strict=True):
        assert info.unit == spec.our_unit
        assert info.max_power_kw is None
        assert info.tags == {"device": "vav3", "vendor": profile.vendor, "model": profile.model, **spec.tags}
    assert any(spec.unit is not None and spec.unit != spec.our_unit for spec in profile.points.values())


def test_simulated_points_share_the_device_tags() -> None:
    data, smap = load_yaml(DEVICES / "sim-energy-meter.yaml")
    profile = validate(SimulatorProfile, data, smap)
    device = SimulatorDeviceConfig(id="meter1", driver="simulator", profile="sim-energy-meter", tags={"zone": "z3"})
    infos = device.point_infos(profile)
    assert len(infos) == len(profile.points)
    assert all(info.tags is infos[0].tags for info in infos)
    assert infos[0].tags == {"device": "meter1", "zone": "z3"}
    assert all(info.measurement == "energy_meter" for info in infos)
    assert [info.max_power_kw for info in infos] == [spec.max_power_kw for spec in profile.points.values()]


def test_a_device_breaker_backs_off_between_its_bounds_and_logs_as_its_driver(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    breaker = device_breaker(
        "modbus[b] m1 (unit 1)", 2.0, 5.0, clock=lambda: now[0], jitter=lambda: 0.5, logger=logging.getLogger("x.y")
    )
    with caplog.at_level(logging.WARNING, logger="x.y"):
        waits = [breaker.failed("no answer") for _ in range(4)]
    # jitter 0.5 is the middle of the spread: the waits are the bare doubling, capped at backoff_max
    assert waits == [2.0, 4.0, 5.0, 5.0]
    assert not breaker.allows(104.0) and breaker.allows(105.0)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("x.y", "modbus[b] m1 (unit 1): no answer; retrying in the background")
    ]
