"""The sample site under drivers/modbus/ loads and plans, so the documentation cannot rot."""

from __future__ import annotations

from pathlib import Path

from drivers.modbus.cli import format_probe
from drivers.modbus.source import build_sources
from gateway.cli import main
from gateway.config.site import load_site

SAMPLE = Path(__file__).resolve().parents[3] / "drivers" / "modbus" / "sample-site.yaml"


def test_sample_site_loads_and_builds_one_source_per_bus() -> None:
    site = load_site(SAMPLE)
    sources = build_sources(site)
    assert [s.name for s in sources] == ["modbus[rs485_1]", "modbus[plant_gw]"]
    assert sources[0].devices == {"main_meter", "apt101", "lift_meter"}
    assert site.registry["ahu3_fan.frequency_setpoint_hz"].writable
    assert site.registry["main_meter.import_kwh"].unit == "kWh"


def test_plan_command_prints_every_bus(capsys: object) -> None:
    assert main(["modbus", "plan", str(SAMPLE)]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "bus rs485_1 (rtu /dev/ttyUSB0 9600 8E1" in out
    assert "main_meter unit 1 (Eastron SDM630): 5 requests touching 52 registers (10 fill) for 21 points" in out
    assert "unit 7 holding 8501..8502 (2 registers) -> 2 points: command_word, frequency_setpoint_hz" in out


def test_plan_command_reports_config_errors(tmp_path: Path, capsys: object) -> None:
    bad = tmp_path / "site.yaml"
    bad.write_text(SAMPLE.read_text().replace("bus: plant_gw, unit: 3", "bus: nowhere, unit: 3"))
    assert main(["modbus", "plan", str(bad)]) == 1
    assert "names unknown Modbus bus 'nowhere'" in capsys.readouterr().err  # type: ignore[attr-defined]


def test_probe_table_shows_all_orders_side_by_side() -> None:
    text = format_probe(100, [0x4049, 0x0FDB])
    assert "     100  0x4049   16457   16457   18752  @I" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("100  f32"))
    assert "3.141593" in row.split()[2]  # ABCD column
    assert len(row.split()) == 6  # address, type, four orders
