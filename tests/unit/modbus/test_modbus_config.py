"""Profile, bus and device validation: every mistake a register map can hold fails at load with file:line:col."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig, ModbusProfile
from drivers.modbus.planner import configured_max_registers, describe_limit, plan_device
from gateway.config.site import Site, load_site
from gateway.config.source import load_yaml, validate
from gateway.errors import ConfigError

REAL_PROFILES = [
    "eastron-sdm630",
    "eastron-sdm120",
    "schneider-iem3250",
    "carlo-gavazzi-em24",
    "schneider-atv320",
    "vaisala-gmw90",
]
DEVICES = Path(__file__).resolve().parents[3] / "firmware_configs" / "devices"


def load_profile_text(tmp_path: Path, text: str) -> ModbusProfile:
    path = tmp_path / "profile.yaml"
    path.write_text(text)
    data, smap = load_yaml(path)
    return validate(ModbusProfile, data, smap)


HEADER = "driver: modbus\nvendor: Acme\nmodel: M1\ndoc: Acme M1 manual rev 3\npoints:\n"


@pytest.mark.parametrize("name", REAL_PROFILES)
def test_real_profiles_load_and_name_their_document(name: str) -> None:
    data, smap = load_yaml(DEVICES / f"{name}.yaml")
    profile = validate(ModbusProfile, data, smap)
    assert len(profile.doc) > 20
    assert profile.points
    # an engineer must know which part of the register map a profile maps (issue 15): a missing value is then
    # known to be unmapped, not unavailable
    assert profile.coverage is not None and "not mapped" in profile.coverage
    device = ModbusDeviceConfig(id="d1", driver="modbus", profile=name, bus="b", unit=1)
    infos = device.point_infos(profile)
    assert len(infos) == len(profile.points)
    assert all(info.measurement == profile.measurement_name for info in infos)


@pytest.mark.parametrize(
    ("points", "line", "col", "message"),
    [
        ("  a: {table: holding, address: 0, type: u32, order: AB}\n", 6, 6, "order 'AB' does not fit a 32-bit u32"),
        ("  a: {table: holding, address: 0, type: u16, order: CDAB}\n", 6, 6, "order 'CDAB' does not fit a 16-bit"),
        ("  a: {table: holding, address: 65534, type: f64}\n", 6, 6, "ends past the last address 65535"),
        ("  a: {table: holding, address: 70000, type: u16}\n", 6, 32, "less than or equal to 65535"),
        (
            "  a: {table: holding, address: 0, type: u32}\n  b: {table: holding, address: 1, type: u16}\n",
            7,
            32,
            "b overlaps a at holding address 1",
        ),
        ("  a: {table: input, address: 0, type: u16, writable: true}\n", 6, 6, "a input cannot be written"),
        ("  a: {table: holding, address: 0, type: bool}\n", 6, 6, "needs 'bit'"),
        ("  a: {table: holding, address: 0, type: bool, bit: 3, writable: true}\n", 6, 6, "cannot be written safely"),
        ("  a: {table: coil, address: 0, type: u16}\n", 6, 6, "its type is bool"),
        ("  a: {table: holding, address: 0}\n", 6, 6, "needs a type"),
        ("  a: {table: holding, address: 0, type: string}\n", 6, 6, "needs 'length'"),
        ("  a: {table: holding, address: 0, type: u16, writable: true, min: 5, max: 1}\n", 6, 6, "min (5.0) is"),
        ("  a: {table: holding, address: 0, type: u16, scale: 0}\n", 6, 6, "scale cannot be 0"),
        ("  a: {table: holding, address: 0, type: u16, poll: soon}\n", 6, 52, "invalid duration"),
        ("  a: {table: holding, address: 0, type: u16, colour: red}\n", 6, 46, "unknown key 'colour'"),
        ("  Bad-Name: {table: holding, address: 0, type: u16}\n", 6, 13, "not a valid id"),
    ],
)
def test_profile_errors_point_at_the_line(tmp_path: Path, points: str, line: int, col: int, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_profile_text(tmp_path, HEADER + points)
    diagnostic = caught.value.diagnostics[0]
    assert message in diagnostic.message
    assert (diagnostic.line, diagnostic.col) == (line, col), diagnostic.format()
    assert diagnostic.source_line is not None


def test_bits_of_one_register_and_the_whole_register_may_coexist(tmp_path: Path) -> None:
    profile = load_profile_text(
        tmp_path,
        HEADER
        + "  status: {table: holding, address: 5, type: u16}\n"
        + "  ready: {table: holding, address: 5, type: bool, bit: 0}\n"
        + "  fault: {table: holding, address: 5, type: bool, bit: 3}\n",
    )
    assert set(profile.points) == {"status", "ready", "fault"}


def test_the_same_bit_twice_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fault uses the same bit as ready"):
        load_profile_text(
            tmp_path,
            HEADER
            + "  ready: {table: holding, address: 5, type: bool, bit: 0}\n"
            + "  fault: {table: holding, address: 5, type: bool, bit: 0}\n",
        )


def test_same_address_in_different_tables_is_fine(tmp_path: Path) -> None:
    profile = load_profile_text(
        tmp_path,
        HEADER + "  a: {table: holding, address: 0, type: u32}\n  b: {table: input, address: 0, type: u32}\n",
    )
    assert profile.points["a"].width == profile.points["b"].width == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"id": "b", "type": "tcp"}, "a tcp bus needs 'host'"),
        ({"id": "b", "type": "rtu"}, "an rtu bus needs 'serial'"),
        ({"id": "b", "type": "tcp", "host": "h", "serial": "/dev/ttyS0"}, "'serial' is for rtu buses"),
        ({"id": "b", "type": "rtu", "serial": "/dev/ttyS0", "baudrate": 1000}, "baudrate"),
        ({"id": "b", "type": "tcp", "host": "h", "backoff_min": "10min", "backoff_max": "1min"}, "backoff_min"),
    ],
)
def test_bus_errors(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModbusBusConfig.model_validate(data)


def test_rtu_frame_gap_is_three_and_a_half_characters() -> None:
    slow = ModbusBusConfig.model_validate({"id": "b", "type": "rtu", "serial": "/dev/x", "baudrate": 9600})
    fast = ModbusBusConfig.model_validate({"id": "b", "type": "rtu", "serial": "/dev/x", "baudrate": 115200})
    tcp = ModbusBusConfig.model_validate({"id": "b", "type": "tcp", "host": "h"})
    assert slow.gap_s == pytest.approx(3.5 * 10 / 9600)
    assert fast.gap_s == pytest.approx(0.00175)
    assert tcp.gap_s == 0


def test_unit_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        ModbusDeviceConfig.model_validate({"id": "d", "driver": "modbus", "profile": "p", "bus": "b", "unit": 0})


SITE = """\
version: 1
gateway: {{id: gw, site: tower}}
profile_dirs: ["{devices}"]
modbus_buses:
  - {{id: line1, type: rtu, serial: /dev/ttyUSB0{bus_extra}}}
devices:
  - {{id: meter, driver: modbus, profile: eastron-sdm630, bus: line1, unit: 1{device_extra}}}
"""


def load_test_site(tmp_path: Path, bus_extra: str = "", device_extra: str = "") -> Site:
    path = tmp_path / "site.yaml"
    path.write_text(SITE.format(devices=DEVICES, bus_extra=bus_extra, device_extra=device_extra))
    return load_site(path)


@pytest.mark.parametrize(
    ("bus_extra", "device_extra", "limit", "origin"),
    [
        ("", "", 60, "profile"),
        (", max_registers: 40", "", 40, "bus"),
        (", max_registers: 40", ", max_registers: 20", 20, "device"),
        ("", ", max_registers: 100", 60, "profile"),  # the smallest wins: a site cannot exceed what the profile says
    ],
)
def test_max_registers_is_settable_on_the_device_and_the_bus(
    tmp_path: Path, bus_extra: str, device_extra: str, limit: int, origin: str
) -> None:
    site = load_test_site(tmp_path, bus_extra, device_extra)
    bus = site.config.modbus_buses[0]
    device = site.config.devices[0]
    assert isinstance(device, ModbusDeviceConfig)
    profile = site.profiles["meter"]
    assert isinstance(profile, ModbusProfile)
    assert configured_max_registers(bus, device, profile) == limit
    assert all(r.count <= limit for r in plan_device(bus, device, profile))
    assert describe_limit(bus, device, profile) == f"max {limit} registers per read ({origin})"


@pytest.mark.parametrize(("bus_extra", "device_extra"), [(", max_registers: 0", ""), ("", ", max_registers: 126")])
def test_max_registers_outside_1_to_125_is_refused_at_its_line(
    tmp_path: Path, bus_extra: str, device_extra: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_test_site(tmp_path, bus_extra, device_extra)
    text = str(caught.value)
    assert "max_registers" in text
    assert f"site.yaml:{5 if bus_extra else 7}:" in text, text
