"""Config loading: golden broken sites (tests/cases/config/<case>/{site.yaml, expected.err}) and the field types."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config.site import load_site
from gateway.config.source import load_yaml
from gateway.config.types import Secret, parse_duration, parse_size, read_secret_file
from gateway.errors import ConfigError
from gateway.preflight import load_checked_site

CASES = Path(__file__).resolve().parents[1] / "cases" / "config"
REPO = Path(__file__).resolve().parents[2]


def _first_lines(exc: ConfigError, case: Path) -> list[str]:
    """``file:line:col: message`` of each diagnostic, with paths made relative so the goldens are portable."""
    out = []
    for diag in exc.diagnostics:
        line = diag.format().splitlines()[0]
        line = line.replace(str(case) + os.sep, "").replace(str(REPO), "<repo>")
        out.append(line)
    return out


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_broken_site_reports_exact_position(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    case_dir = CASES / case
    monkeypatch.delenv("EDGE_TEST_UNSET_INFLUX_TOKEN", raising=False)
    expected = (case_dir / "expected.err").read_text().splitlines()
    with pytest.raises(ConfigError) as info:
        # as `check` and `run` load it: a refused site file still has its rule files checked
        load_checked_site(case_dir / "site.yaml")
    assert _first_lines(info.value, case_dir) == expected
    echo = case_dir / "expected.echo"
    if echo.exists():  # the whole printed text: the offending lines as echoed (secret values masked)
        printed = str(info.value).replace(str(case_dir) + os.sep, "").replace(str(REPO), "<repo>")
        assert printed.splitlines() == echo.read_text().splitlines()
        assert "hunter" not in printed


def test_golden_cases_cover_the_required_kinds() -> None:
    required = {
        "syntax_error",
        "unknown_key",
        "wrong_type",
        "duplicate_device",
        "missing_profile",
        "bad_point_id",
        "missing_env_secret",
        "bad_duration",
        # every error at once: one broken part does not hide the others (site, profile, rule file)
        "bad_device_next_device",
        "bad_bus_device_checked",
        "bad_profile_and_site_error",
        "site_error_and_rule_file",
        "wrong_type_top_level",
        "five_errors",
        "aggregate_and_device_errors",
        "bad_profile_dirs",
        # PyYAML's syntax errors in plain words
        "unclosed_double_quote",
        "unclosed_single_quote",
        "quote_inside_quotes",
        "quote_closed_next_line",
        "unclosed_flow_sequence",
        "flow_missing_comma",
        "stray_bracket",
        "stray_brace",
        "mismatched_closer",
        "undefined_alias",
        "colon_in_value",
        "tab_in_flow",
        "two_documents",
        "document_end_marker",
        "control_character",
        "not_utf8",
    }
    assert required <= {p.name for p in CASES.iterdir()}
    for case in required:  # each says what happened in words, not in PyYAML's token names
        assert "YAML syntax error" not in (CASES / case / "expected.err").read_text(), case


def test_every_diagnostic_shows_the_offending_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_site(CASES / "unknown_key" / "site.yaml")
    text = str(info.value)
    assert "    pol: 5s" in text
    assert text.splitlines()[2].strip() == "^"


def test_demo_site_is_valid() -> None:
    site = load_site(REPO / "firmware_configs" / "sites" / "demo.yaml")
    assert "zone3.co2" in site.registry
    assert site.registry["ahu3.vent_setpoint_pct"].writable
    assert site.registry["apt101.energy_kwh"].unit == "kWh"


def test_yaml_1_1_booleans_stay_strings(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("a: on\nb: no\nc: true\nd: False\ne: yes\n")
    data, _ = load_yaml(path)
    assert data == {"a": "on", "b": "no", "c": True, "d": False, "e": "yes"}


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("a: 1\nb: 2\na: 3\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert info.value.diagnostics[0].format().startswith(f"{path}:3:1: duplicate key 'a'")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_site(tmp_path / "nope.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"version: 1\nname: caf\xe9 \xe0 la carte\n")
    with pytest.raises(ConfigError) as info:
        load_site(bad)
    # at the byte (line 2, column 10), the line echoed with the byte replaced, saying what to do
    [diagnostic] = info.value.diagnostics
    assert (diagnostic.line, diagnostic.col) == (2, 10)
    assert diagnostic.message.startswith("byte 0xe9 is not UTF-8: save the file as UTF-8")
    assert diagnostic.format().splitlines()[1:] == ["    name: caf\ufffd \ufffd la carte", " " * 13 + "^"]


def test_empty_site_file_says_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load_site(path)
    messages = [d.message for d in info.value.diagnostics]
    assert "missing required key 'version'" in messages
    assert "missing required key 'gateway'" in messages


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("15min", 900.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        (3, 3.0),
        ("1.5s", 1.5),
        ("10m", 600.0),
        ("7", 7.0),
    ],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5 minutes", "fast", "-1s", True, None, [1], "1y", float("inf"), float("nan")])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "size"), [("64MiB", 64 * 1024**2), ("1GB", 10**9), (4096, 4096), ("2 KiB", 2048)])
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["lots", "12TB", "MiB", True])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def test_secret_file_is_read_and_never_printed(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("s3cr3t-token\n")
    secret = read_secret_file(path)
    assert secret.reveal() == "s3cr3t-token"
    assert "s3cr3t" not in repr(secret)
    assert isinstance(secret, Secret)
    with pytest.raises(ValueError, match="cannot read secret file"):
        read_secret_file(tmp_path / "missing")
    with pytest.raises(ValueError, match="larger than 64 KiB"):
        read_secret_file(Path("/dev/zero"))


def test_env_secret_is_expanded_from_the_environment(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\ngateway: {id: gw1, site: tower}\n"
        "uplinks:\n  influx: {url: 'http://127.0.0.1:8086', org: city, bucket: b, token: '${MY_TOKEN}'}\n"
    )
    loaded = load_site(site, env={"MY_TOKEN": "abc123"})
    influx = loaded.config.uplinks.influx
    assert influx is not None
    assert influx.token is not None
    assert influx.token.reveal() == "abc123"
    assert "abc123" not in repr(loaded.config)


def test_scalars_are_not_coerced_but_parsed_fields_still_parse() -> None:
    from gateway.config.types import PositiveDuration, StrictModel

    class Example(StrictModel):
        every: PositiveDuration | None = None
        port: int | None = None
        enabled: bool = True

    assert Example.model_validate({"every": "15min"}).every == 900.0
    for bad in ({"port": "1883"}, {"enabled": "yes"}, {"enabled": 1}, {"port": True}):
        with pytest.raises(ValueError, match="expected"):
            Example.model_validate(bad)


LITERAL_SECRETS = """version: 1
gateway: {id: gw1, site: tower}
mqtt_sources:
  - id: broker
    host: 127.0.0.1
    subscriptions: [{id: z2m, topic: "zigbee2mqtt/+", decoder: {type: zigbee2mqtt}}]
    username: gw
    password: hunter2
uplinks:
  influx: {url: "http://127.0.0.1:8086", org: city, bucket: b, token: s3cr3t}
"""


def test_a_literal_secret_is_a_warning_pointing_to_env_or_file(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(LITERAL_SECRETS)
    site = load_site(path)
    printed = [w.format() for w in site.warnings]
    assert [text.splitlines()[0] for text in printed] == [
        f"{path}:8:15: warning: mqtt_sources.0.password is a literal secret in the file: use password: ${{ENV_NAME}} "
        "(an environment variable) or password_file: PATH",
        f"{path}:10:71: warning: uplinks.influx.token is a literal secret in the file: use token: ${{ENV_NAME}} "
        "(an environment variable) or token_file: PATH",
    ]
    assert all(w.severity == "warning" for w in site.warnings)
    assert "hunter2" not in "".join(printed)
    assert "s3cr3t" not in "".join(printed)
    assert 'password: "****"' in printed[0]


def test_secrets_from_the_environment_or_a_file_are_not_warned_about(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cr3t\n")
    path = tmp_path / "site.yaml"
    path.write_text(
        LITERAL_SECRETS.replace("password: hunter2", "password: ${MQTT_PASSWORD}").replace(
            "token: s3cr3t", "token_file: token"
        )
    )
    site = load_site(path, env={"MQTT_PASSWORD": "hunter2"})
    assert site.warnings == ()


def test_key_names_alone_do_not_make_a_secret(tmp_path: Path) -> None:
    """``tls.key`` is a path, an MQTT command's ``key`` a JSON field: only secret fields are checked."""
    path = tmp_path / "site.yaml"
    path.write_text(
        "version: 1\ngateway: {id: gw1, site: tower}\n"
        "uplinks:\n  influx: {url: 'http://127.0.0.1:8086', org: city, bucket: b, token: '${T}'}\n"
    )
    assert load_site(path, env={"T": "x"}).warnings == ()


def _check(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def test_check_prints_the_warning_and_passes_and_strict_fails(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(LITERAL_SECRETS)
    relaxed = _check(path)
    assert relaxed.returncode == 0, relaxed.stderr
    assert relaxed.stdout.startswith(f"{path}: ok (0 devices")
    assert "2 warning(s)" in relaxed.stdout
    assert f"{path}:8:15: warning: mqtt_sources.0.password is a literal secret" in relaxed.stderr
    strict = _check("--strict", path)
    assert strict.returncode == 1
    assert strict.stderr.count(": warning: ") == 2
    assert strict.stderr.splitlines()[-1] == f"{path}: 2 warning(s), errors with --strict"
    for output in (relaxed.stdout + relaxed.stderr, strict.stdout + strict.stderr):
        assert "hunter2" not in output
        assert "s3cr3t" not in output


def test_check_reports_five_errors_in_five_sections_in_one_run(tmp_path: Path) -> None:
    """One `check` run reports every error of a site file and its rule file: a bad time zone (gateway), a
    misspelt key (storage), a bad baud rate (the second bus), a missing profile (the second device) and an unknown
    point (the rule file), and nothing else: the device on the broken bus and the rule reading the device whose
    profile is missing are not blamed for them. Exit 1, as for any refused site (docs/commands.md)."""
    case = CASES / "five_errors"
    for name in ("site.yaml", "rules.yaml"):
        (tmp_path / name).write_text((case / name).read_text())
    site = tmp_path / "site.yaml"
    result = _check(site, "--data-dir", tmp_path / "data")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    located = [line for line in result.stderr.splitlines() if line.startswith(str(tmp_path))]
    assert [line.split(": ", 1)[0] for line in located] == [
        f"{site}:5:13",
        f"{site}:7:3",
        f"{site}:10:66",
        f"{site}:13:60",
        f"{tmp_path / 'rules.yaml'}:4:36",
        str(site),  # the summary line
    ]
    assert "unknown time zone 'Mars/Olympus'" in located[0]
    assert "unknown key 'durabilty' (did you mean 'durability'?)" in located[1]
    assert "modbus_buses.1.baudrate" in located[2]
    assert "device profile 'acme-unknown-meter' not found" in located[3]
    assert "unknown point 'meter1.powr_w' (did you mean 'meter1.power_w'?)" in located[4]
    assert located[5] == f"{site}: 5 error(s)"


def test_check_reports_an_error_in_every_section_of_a_rule_file(tmp_path: Path) -> None:
    """A rule file with a broken point, schedule, allow entry, rule (no id) and an unknown point in another rule:
    all five in one `check` run of a site that is otherwise fine."""
    (tmp_path / "site.yaml").write_text(
        "version: 1\ngateway: {id: gw1, site: tower}\n"
        "devices:\n  - {id: zone1, driver: simulator, profile: sim-zone}\n"
        "rules: [rules.yaml]\n"
    )
    (tmp_path / "rules.yaml").write_text(
        "version: 1\n"
        "points:\n"
        "  building.t2: {expr: 'zone1.temperature * 2', window: 5min}\n"
        "schedules:\n"
        "  day: {from: '07:00', to: '25:00'}\n"
        "allow:\n"
        "  simulator:\n"
        "    - {point: zone1.temperature, min: 30, max: 10}\n"
        "rules:\n"
        "  - when: zone1.temperature > 30\n"
        "    then: [{event: {type: hot, message: hot}}]\n"
        "  - id: uses-them\n"
        "    when: building.t2 > 50 and zone1.temperatur > 1\n"
        "    only_during: day\n"
        "    then: [{write: {point: zone1.temperature, value: 20}}]\n"
    )
    result = _check(tmp_path / "site.yaml", "--data-dir", tmp_path / "data")
    assert result.returncode == 1, result.stdout + result.stderr
    rules = str(tmp_path / "rules.yaml")
    located = [line.split(": ", 1)[0] for line in result.stderr.splitlines() if line.startswith(rules)]
    assert located == [f"{rules}:3:16", f"{rules}:5:28", f"{rules}:8:7", f"{rules}:10:5", f"{rules}:13:32"]
    assert result.stderr.splitlines()[-1] == f"{tmp_path / 'site.yaml'}: 5 error(s)"


#: characters whose misplacement makes PyYAML's syntax errors: quotes, brackets, separators, tabs, markers
_MISTAKES = ["'", '"', "[", "]", "{", "}", ":", ",", "\t", "*", "&", "-", "#", "\n", "---\n", "...\n", "\x07"]


#: a small site with every YAML form the shipped files use: block mappings, a list, flow mappings and lists, quotes
_COMPACT_SITE = """\
version: 1
gateway:
  id: gw1
  name: "Tower A"
devices:
  - {id: m1, driver: simulator, profile: 'sim-zone'}
rules: [a.yaml]
"""


def test_any_one_misplaced_character_gives_a_positioned_error_or_loads(tmp_path: Path) -> None:
    """Each character above inserted at every position of a site file: the loader either loads it or raises
    ConfigError with every diagnostic inside the file (never another exception, never ``:0:0``)."""
    path = tmp_path / "site.yaml"
    refused = 0
    for position in range(len(_COMPACT_SITE) + 1):
        for mistake in _MISTAKES:
            mutated = _COMPACT_SITE[:position] + mistake + _COMPACT_SITE[position:]
            try:
                load_yaml(path, text=mutated)
            except ConfigError as exc:
                refused += 1
                lines = mutated.splitlines()
                for diagnostic in exc.diagnostics:
                    assert 1 <= diagnostic.line <= len(lines) + 1, (mutated, diagnostic.format())
                    assert diagnostic.col >= 1, (mutated, diagnostic.format())
    assert refused > len(_COMPACT_SITE)  # most of these mistakes break the file: the loop did test errors


def test_run_reports_a_refused_sites_rule_file_errors_too(tmp_path: Path) -> None:
    """`run` loads a site as `check` does: a broken device does not hide an unknown point in a rule file."""
    case = CASES / "site_error_and_rule_file"
    for name in ("site.yaml", "rules.yaml"):
        (tmp_path / name).write_text((case / name).read_text())
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "run", str(tmp_path / "site.yaml"), "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert f"{tmp_path / 'site.yaml'}:6:70: devices.0.seed" in result.stderr
    assert f"{tmp_path / 'rules.yaml'}:4:54: unknown point 'meter2.powr_kw'" in result.stderr
    assert "unknown point 'meter1" not in result.stderr  # the broken device's points are not blamed on the rule
    assert result.stderr.splitlines()[-1] == f"{tmp_path / 'site.yaml'}: 2 error(s); not started"
    assert not (tmp_path / "data").exists()
