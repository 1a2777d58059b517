"""Schedules, windows, the samples CSV and the ``rules check``/``rules test`` commands."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.errors import ConfigError
from gateway.registry import PointInfo
from rules.cli import register
from rules.config import ScheduleConfig, parse_days
from rules.replay import parse_time, read_samples_csv
from rules.schedule import Schedule
from rules.window import Window

ROOT = Path(__file__).resolve().parents[3]
DEMO_SITE = ROOT / "firmware_configs" / "sites" / "demo.yaml"
DEMO_RULES = ROOT / "firmware_configs" / "rules" / "demo.yaml"
S = 10**9


def at(text: str, zone: str) -> int:
    return round(dt.datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp() * S)


def schedule(zone: str = "UTC", **fields: object) -> Schedule:
    return Schedule.from_config("s", ScheduleConfig.model_validate(fields), zone)


# -- schedules -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        ("mon-fri", {0, 1, 2, 3, 4}),
        ("sat-sun", {5, 6}),
        ("fri-mon", {4, 5, 6, 0}),
        ("mon,wed", {0, 2}),
        ("daily", set(range(7))),
    ],
)
def test_day_ranges(days: str, expected: set[int]) -> None:
    assert parse_days(days) == expected


def test_bad_days_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid days"):
        parse_days("monday-friday")


def test_office_hours_in_their_own_time_zone() -> None:
    office = schedule("UTC", days="mon-fri", **{"from": "07:00", "to": "19:00"}, tz="Asia/Shanghai")
    assert office.active(at("2026-03-02T07:00:00", "Asia/Shanghai"))  # Monday 07:00 in Shanghai
    assert not office.active(at("2026-03-02T06:59:00", "Asia/Shanghai"))
    assert not office.active(at("2026-03-02T19:00:00", "Asia/Shanghai"))  # "to" is exclusive
    assert office.active(at("2026-03-02T00:00:00", "UTC"))  # 08:00 in Shanghai
    assert not office.active(at("2026-03-07T10:00:00", "Asia/Shanghai"))  # Saturday


def test_night_across_midnight_belongs_to_the_day_it_starts() -> None:
    night = schedule("Europe/Berlin", days="fri", **{"from": "22:00", "to": "06:00"})
    assert night.active(at("2026-03-06T23:30:00", "Europe/Berlin"))  # Friday night
    assert night.active(at("2026-03-07T05:59:00", "Europe/Berlin"))  # Saturday early: Friday's period
    assert not night.active(at("2026-03-07T06:00:00", "Europe/Berlin"))
    assert not night.active(at("2026-03-07T23:30:00", "Europe/Berlin"))  # Saturday night: not listed
    assert not night.active(at("2026-03-06T05:00:00", "Europe/Berlin"))  # Friday early: Thursday's period


def test_holidays_switch_a_day_off_including_its_overnight_part() -> None:
    night = schedule("UTC", days="daily", **{"from": "22:00", "to": "06:00"}, holidays=["2026-12-24"])
    assert not night.active(at("2026-12-24T23:00:00", "UTC"))
    assert not night.active(at("2026-12-25T02:00:00", "UTC"))  # still the 24th's period
    assert night.active(at("2026-12-25T23:00:00", "UTC"))
    assert night.active(at("2026-12-24T02:00:00", "UTC"))  # the 23rd's period


def test_wall_clock_across_daylight_saving_changes() -> None:
    morning = schedule("Europe/Berlin", days="daily", **{"from": "07:00", "to": "08:00"})
    # 07:30 local is 06:30 UTC in winter and 05:30 UTC in summer (the change is on 2026-03-29)
    assert morning.active(at("2026-03-28T06:30:00", "UTC"))
    assert morning.active(at("2026-03-30T05:30:00", "UTC"))
    assert not morning.active(at("2026-03-30T06:30:00", "UTC"))


def test_whole_day_when_from_equals_to() -> None:
    weekend = schedule("UTC", days="sat-sun", **{"from": "00:00", "to": "00:00"})
    assert weekend.active(at("2026-03-07T12:00:00", "UTC"))
    assert not weekend.active(at("2026-03-06T12:00:00", "UTC"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"from": "7:00pm", "to": "08:00"}, "invalid time"),
        ({"from": "24:30", "to": "08:00"}, "invalid time"),
        ({"from": "07:00", "to": "08:00", "tz": "Mars/Olympus"}, "unknown time zone"),
        ({"from": "07:00", "to": "08:00", "holidays": ["someday"]}, "date"),
    ],
)
def test_bad_schedules_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScheduleConfig.model_validate(fields)


# -- windows -------------------------------------------------------------------------------------------------------


def test_window_aggregates_and_expiry() -> None:
    span = 60 * S
    windows = {name: Window(name, span) for name in ("avg", "min", "max", "sum", "count")}
    for ts, value in [(0, 5.0), (10, 1.0), (20, 9.0), (30, 3.0)]:
        for window in windows.values():
            window.add(ts * S, value)
    assert {n: w.value() for n, w in windows.items()} == {"avg": 4.5, "min": 1.0, "max": 9.0, "sum": 18.0, "count": 4}
    for window in windows.values():
        assert window.expire(70 * S)  # samples at 0 and 10 s leave the 60 s window
    assert {n: w.value() for n, w in windows.items()} == {"avg": 6.0, "min": 3.0, "max": 9.0, "sum": 12.0, "count": 2}
    for window in windows.values():
        window.expire(200 * S)
    assert {n: w.value() for n, w in windows.items()} == dict.fromkeys(("avg", "min", "max", "sum"), None) | {
        "count": 0
    }


def test_min_max_with_repeated_timestamps_and_values() -> None:
    window = Window("min", 10 * S)
    for value in (3.0, 3.0, 1.0, 1.0, 2.0):
        window.add(0, value)
    window.add(5 * S, 4.0)
    assert window.value() == 1.0
    window.expire(10 * S)
    assert window.value() == 4.0


def test_integrate_and_rate() -> None:
    energy = Window("integrate", 3600 * S, per_s=3600.0)  # kW over an hour -> kWh
    rate = Window("rate", 3600 * S, per_s=3600.0)  # Pa per hour
    for ts, value in [(0, 10.0), (1800, 10.0), (3599, 30.0)]:
        energy.add(ts * S, value)
        rate.add(ts * S, value)
    assert energy.value() == pytest.approx(5.0 + (10 + 30) / 2 * 1799 / 3600)
    assert rate.value() == pytest.approx(20.0 / 3599 * 3600)
    single = Window("rate", 60 * S)
    single.add(0, 1.0)
    assert single.value() is None  # a rate needs two samples


def test_a_late_sample_is_ignored_by_a_window() -> None:
    window = Window("sum", 60 * S)
    window.add(10 * S, 1.0)
    window.add(5 * S, 100.0)
    assert window.value() == 1.0


# -- samples CSV -------------------------------------------------------------------------------------------------


def test_times_absolute_naive_and_relative() -> None:
    zone = ZoneInfo("Asia/Shanghai")
    start = at("2026-03-02T08:00:00", "Asia/Shanghai")
    assert parse_time("2026-03-02T08:00:00", zone, None) == start
    assert parse_time("2026-03-02T00:00:00+00:00", zone, None) == start
    assert parse_time("+5min", zone, start) == start + 300 * S
    assert parse_time("90", zone, start) == start + 90 * S
    with pytest.raises(ValueError, match="needs --start"):
        parse_time("+5min", zone, None)


def test_samples_csv_errors_name_the_row(tmp_path: Path) -> None:
    path = tmp_path / "samples.csv"
    path.write_text("time,point,value\n+0,zone1.co2,abc\n+1,Zone1,5\n+2,zone1.co2,5,maybe\n")
    registry = {"zone1.co2": PointInfo(id="zone1.co2")}
    with pytest.raises(ConfigError) as caught:
        read_samples_csv(path, zone=ZoneInfo("UTC"), start_ns=0, registry=registry)
    assert [(d.line, d.message) for d in caught.value.diagnostics] == [
        (2, "'abc' is not a number"),
        (3, "'Zone1' is not a point id (device.point)"),
        (4, "quality must be good, uncertain or bad, not 'maybe'"),
    ]


def test_samples_csv_needs_its_header(tmp_path: Path) -> None:
    path = tmp_path / "samples.csv"
    path.write_text("ts,id,v\n")
    with pytest.raises(ConfigError, match="header must be time,point,value"):
        read_samples_csv(path, zone=ZoneInfo("UTC"), start_ns=0, registry=None)


# -- the commands ------------------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edge-gateway")
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


def test_rules_check_the_demo_file_against_the_demo_site(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["rules", "check", str(DEMO_RULES), "--site", str(DEMO_SITE)]) == 0
    assert capsys.readouterr().out.startswith("ok: 5 rules, 9 derived points, 2 schedules, 1 allowed writes")


def test_rules_check_without_a_site_checks_all_but_names(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "version: 1\nrules:\n  - id: r\n    when: any.point > 1\n    then: [{event: {type: x, message: m}}]\n"
    )
    assert run_cli(["rules", "check", str(path)]) == 0
    assert "point names not checked" in capsys.readouterr().out
    path.write_text(
        "version: 1\nrules:\n  - id: r\n    when: any.point.__class__ > 1\n    then: [{event: {type: x, message: m}}]\n"
    )
    assert run_cli(["rules", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:4:11: attribute '__class__' not allowed" in err
    assert "^" in err


def test_rules_check_reports_errors_of_every_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    broken = ROOT / "tests" / "cases" / "rules" / "broken"
    files = [str(broken / "unknown_point.yaml"), str(broken / "huge_power.yaml")]
    assert run_cli(["rules", "check", *files, "--site", str(DEMO_SITE)]) == 1
    err = capsys.readouterr().err
    assert "unknown_point.yaml:4:32:" in err
    assert "huge_power.yaml:4:24:" in err


def test_rules_check_with_a_broken_site_reports_the_site_and_the_rules_at_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # a bad device in the site does not hide an unknown point in the rule file, and the rule's points on the good
    # device are still checked; points of the device that did not load are not blamed
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\ngateway: {id: gw1, site: lab}\nhttp: {enabled: false}\n"
        "devices:\n"
        "  - {id: good, driver: simulator, profile: sim-zone, poll: 1s}\n"
        "  - {id: bad, driver: simulator, profile: sim-zone, poll: soon}\n"
    )
    rules = tmp_path / "r.yaml"
    rules.write_text(
        "version: 1\nrules:\n"
        "  - id: a\n    when: good.co2 > 1000 and bad.co2 > 1\n    then: [{event: {type: x, message: m}}]\n"
        "  - id: b\n    when: good.no_such_point > 1\n    then: [{event: {type: x, message: m}}]\n"
    )
    assert run_cli(["rules", "check", str(rules), "--site", str(site)]) == 1
    err = capsys.readouterr().err
    assert f"{site}:6:" in err and "poll" in err
    assert f"{rules}:7:" in err and "good.no_such_point" in err
    assert "bad.co2" not in err


def test_rules_test_refuses_relative_times_without_start(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = tmp_path / "s.csv"
    data.write_text("time,point,value\n" + "".join(f"+{i}min,zone1.co2,900\n" for i in range(19)))
    assert run_cli(["rules", "test", str(DEMO_RULES), "--data", str(data), "--site", str(DEMO_SITE)]) == 1
    err = capsys.readouterr().err
    assert err.count("needs --start") == 1  # once for the file, not once per row
    assert "so do 18 more rows" in err


def test_rules_test_accepts_ts_for_the_time_column(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = tmp_path / "s.csv"
    data.write_text("ts,point,value\n2026-03-02T08:00:00,zone1.co2,900\n")
    assert run_cli(["rules", "test", str(DEMO_RULES), "--data", str(data), "--site", str(DEMO_SITE)]) == 0
    assert "# replaying 1 samples" in capsys.readouterr().out


@pytest.mark.parametrize(
    "option", [["--tick", "0s"], ["--tick", "soon"], ["--start", "yesterday"], ["--until", "later"]]
)
def test_rules_test_bad_options_are_usage_errors(
    option: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = tmp_path / "s.csv"
    data.write_text("time,point,value\n2026-03-02T08:00:00,zone1.co2,900\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["rules", "test", str(DEMO_RULES), "--data", str(data), *option])
    assert exit_info.value.code == 2
    assert f"error: argument {option[0]}:" in capsys.readouterr().err


def test_the_documented_demo_replay_runs(capsys: pytest.CaptureFixture[str]) -> None:
    data = ROOT / "firmware_configs" / "rules" / "demo-samples.csv"
    argv = ["rules", "test", str(DEMO_RULES), "--site", str(DEMO_SITE), "--data", str(data)]
    assert run_cli([*argv, "--start", "2026-03-02T08:55:00", "--tick", "10s"]) == 0
    out = capsys.readouterr().out
    assert "2026-03-02 09:00:00  FIRE     co2-high-ventilate (held for 5min)" in out
    assert "2026-03-02 09:15:00  WRITE    ahu3.vent_setpoint_pct = 40 [co2-high-ventilate]" in out
    assert out.rstrip().endswith("0 failures")
