"""``edge-gateway modbus probe|read|plan`` against a real pymodbus server (issue 15, item 3): probe names the table
and function code it read, read splits reads a meter refuses as too long, exits 3 when nothing answered, and prints
values at their point's precision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main

pytestmark = pytest.mark.integration

PROFILE = """\
driver: modbus
vendor: Test
model: Server
doc: tests/integration/modbus/modbus_server.py register layout
coverage: registers 0-99 of the test server
points:
  first: {table: holding, address: 0, type: u16}
  tenth: {table: holding, address: 10, type: i16, scale: 0.1}
  cents: {table: holding, address: 20, type: u16, scale: 0.01, unit: V}
  far: {table: holding, address: 99, type: u16}
  inp: {table: input, address: 3, type: u16}
"""


def test_probe_names_the_table_and_function_code(tcp_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    server = tcp_server("--units", "1")
    where = ["--tcp", f"127.0.0.1:{server.port}", "--unit", "1", "--timeout", "300ms"]
    assert main(["modbus", "probe", *where, "--address", "3", "--count", "2", "--table", "input"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "unit 1, input registers (function 04), addresses 3..4"
    assert "103" in out[3]  # input register 3 of unit 1 is 1*100 + 3
    assert main(["modbus", "probe", *where, "--address", "0", "--count", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "unit 1, holding registers (function 03), addresses 0..0"


def test_probe_help_puts_the_table_first(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["modbus", "probe", "--help"])
    text = capsys.readouterr().out
    assert "--table {holding,input}" in text.split("\n\n")[0], "the usage line shows --table"
    assert "function 04" in text and "input registers" in text


def test_read_splits_refused_reads_and_prints_at_the_points_precision(
    tcp_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = tcp_server("--limit", "5:40")  # the 100-register read is refused with exception 3
    profile = tmp_path / "test-server.yaml"
    profile.write_text(PROFILE)
    code = main(["modbus", "read", "--tcp", f"127.0.0.1:{server.port}", "--unit", "5", "--profile", str(profile)])
    captured = capsys.readouterr()
    assert (code, captured.err) == (0, "")
    rows = {line.split()[0]: line.split()[1:] for line in captured.out.splitlines()}
    assert rows == {
        "first": ["5000"],
        "tenth": ["501.0"],  # 5010 * 0.1 at one decimal, not "501"
        "cents": ["50.20", "V"],  # 5020 * 0.01 at two decimals
        "far": ["5099"],
        "inp": ["503"],
    }


def test_read_of_a_unit_that_answers_nothing_exits_3(
    tcp_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = tcp_server("--units", "1", "--dead", "9")
    profile = tmp_path / "test-server.yaml"
    profile.write_text(PROFILE)
    where = ["--tcp", f"127.0.0.1:{server.port}", "--unit", "9", "--timeout", "200ms"]
    code = main(["modbus", "read", *where, "--profile", str(profile)])
    captured = capsys.readouterr()
    assert code == 3
    assert "unit 9 answered none of the 5 points' reads" in captured.err
    assert all(" BAD " in line for line in captured.out.splitlines())


def test_read_with_some_points_refused_says_so_and_exits_0(
    tcp_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = tcp_server("--units", "1", "--holding", "50")  # address 99 is past the map: exception 2
    profile = tmp_path / "test-server.yaml"
    profile.write_text(PROFILE)
    code = main(["modbus", "read", "--tcp", f"127.0.0.1:{server.port}", "--unit", "1", "--profile", str(profile)])
    captured = capsys.readouterr()
    assert code == 0
    far = [line.split(None, 2) for line in captured.out.splitlines() if line.startswith("far ")]
    assert far == [["far", "BAD", "unit 1 refused read holding 99+1: exception 2 (illegal data address)"]]
    assert captured.err == "warning: 1 of 5 points not read (BAD above)\n"


WIDE_PROFILE = "\n".join(
    [
        "driver: modbus",
        "vendor: Test",
        "model: Wide",
        "doc: tests/integration/modbus/modbus_server.py register layout",
        "points:",
        *(f"  r{i}: {{table: holding, address: {i}, type: u16}}" for i in range(100)),
    ]
)


def test_plan_probe_prints_the_limit_the_meter_taught(
    tcp_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = tcp_server("--limit", "5:60")
    (tmp_path / "test-wide.yaml").write_text(WIDE_PROFILE + "\n")
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\n"
        "gateway: {id: gw, site: lab}\n"
        f'profile_dirs: ["{tmp_path}"]\n'
        "modbus_buses:\n"
        f"  - {{id: lab, type: tcp, host: 127.0.0.1, port: {server.port}, timeout: 300ms}}\n"
        "devices:\n"
        "  - {id: meter, driver: modbus, profile: test-wide, bus: lab, unit: 5, poll: 100ms}\n"
    )
    assert main(["modbus", "plan", str(site)]) == 0
    offline = capsys.readouterr().out
    assert "meter unit 5 (Test Wide): 1 request touching 100 registers" in offline
    assert "max 125 registers per read (protocol limit; refusals with exception 3 are learned at run time)" in offline
    assert main(["modbus", "plan", str(site), "--probe"]) == 0
    probed = capsys.readouterr().out
    assert "meter unit 5 (Test Wide): 2 requests touching 100 registers" in probed
    assert "max 60 registers per read (learned: the device refused more; configured 125)" in probed
    assert "unit 5 holding 0..59 (60 registers) -> 60 points" in probed
    assert "probed: 1 of 1 devices polled" in probed
    assert "meter: online; failed reads: exception_3 4" in probed
