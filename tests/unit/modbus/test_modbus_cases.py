"""Golden cases (tests/cases/modbus/<case>/): a profile in, the exact read requests or diagnostics out."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig, ModbusProfile
from drivers.modbus.planner import plan_device
from gateway.config.source import load_yaml, validate
from gateway.errors import ConfigError

CASES = Path(__file__).resolve().parents[2] / "cases" / "modbus"
CASE_DIRS = sorted(p for p in CASES.iterdir() if p.is_dir())


def test_there_are_plan_and_error_cases() -> None:
    assert sum((d / "expected.plan").exists() for d in CASE_DIRS) >= 5
    assert sum((d / "expected.err").exists() for d in CASE_DIRS) >= 2


@pytest.mark.parametrize("case", CASE_DIRS, ids=[d.name for d in CASE_DIRS])
def test_case(case: Path) -> None:
    settings: dict[str, int] = {}
    if (case / "case.yaml").exists():
        settings, _ = load_yaml(case / "case.yaml")
    data, smap = load_yaml(case / "profile.yaml")
    expected_err = case / "expected.err"
    if expected_err.exists():
        with pytest.raises(ConfigError) as caught:
            validate(ModbusProfile, data, smap)
        got = [f"profile.yaml:{d.line}:{d.col}: {d.message}" for d in caught.value.diagnostics]
        assert got == expected_err.read_text().splitlines()
        return
    profile = validate(ModbusProfile, data, smap)
    bus = ModbusBusConfig.model_validate(
        {
            "id": "bus",
            "type": "tcp",
            "host": "127.0.0.1",
            "max_fill": settings.get("max_fill", 8),
            "max_fill_bits": settings.get("max_fill_bits", 64),
            "max_registers": settings.get("bus_max_registers"),
        }
    )
    device = ModbusDeviceConfig(
        id="dev",
        driver="modbus",
        profile="case",
        bus="bus",
        unit=settings.get("unit", 1),
        max_registers=settings.get("device_max_registers"),
    )
    # a limit the scheduler learned from the device's exception-3 refusals (drivers/modbus/source.py)
    learned = settings.get("learned_registers")
    got = [request.describe() for request in plan_device(bus, device, profile, learned_registers=learned)]
    assert got == (case / "expected.plan").read_text().splitlines()
