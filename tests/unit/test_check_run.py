"""``check`` is "ready to run": for every shipped site, every golden broken site and the start-time refusals that
only ``run`` used to find (a public status page without a token, a short token, key files others can read, bad TLS
files), ``check`` exits 0 exactly when ``run --duration 1`` with a fresh data directory starts and stops cleanly.

Both commands go through the real argument parser in-process (no interpreter start per case); the status page
listens on port 0 (the site's own host, so its loopback rule is what is tested), so concurrent runs never collide.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway.cli import build_parser
from gateway.config.site import load_site
from gateway.errors import ConfigError
from gateway.http.access import parse_listen

REPO = Path(__file__).resolve().parents[2]
#: the shipped sites: the demo and each driver's sample (real devices that are not there: their drivers log an outage)
SHIPPED = sorted((REPO / "firmware_configs" / "sites").glob("*.yaml")) + sorted(
    (REPO / "drivers").glob("*/sample-site.yaml")
)
GOLDEN = sorted((REPO / "tests" / "cases" / "config").glob("*/site.yaml"))

_SIM_SITE = """\
version: 1
gateway: {{id: gw1, site: preflight, timezone: Europe/Berlin}}
http: {http}
devices:
  - {{id: apt1, driver: simulator, profile: sim-energy-meter, seed: 1, poll: 1s}}
{extra}
"""

_INCENTIVES = """\
incentives:
  interval: 1min
  baseline: {{method: fixed, kwh: 0.02}}
  emission_factor: {{kg_per_kwh: 0.5}}
  max_power_kw: 40
  signing_key_file: {keys}/incentive-signing.pem
  pseudonym_key_file: {keys}/incentive-pseudonym.key
  accounts:
    - {{id: "A1", meters: [apt1.energy_kwh]}}
"""


def _cli(argv: list[str]) -> int:
    """The command's exit code through the real parser, without ``gateway.cli.main``'s logging set-up."""
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


def _http_option(site_path: Path) -> list[str]:
    """``--http HOST:0`` with the site's own host (its loopback rule stays what it is), or nothing when the site
    does not load or has no status page."""
    try:
        site = load_site(site_path)
    except ConfigError:
        return []
    if not site.config.http.enabled or site.config.http.listen in (None, "", "off"):
        return []
    host, _port = parse_listen(site.config.http.listen)
    return ["--http", f"[{host}]:0" if ":" in host else f"{host}:0"]


def _generate_keys(directory: Path) -> Path:
    assert _cli(["keys", "generate", "--out", str(directory)]) == 0
    return directory


def _constructed(tmp: Path) -> dict[str, Path]:
    """Sites that load cleanly but that ``run`` refused at start (or starts), built in ``tmp``."""
    token = tmp / "token"
    token.write_text("a-long-enough-access-token\n")
    token.chmod(0o600)
    short = tmp / "short-token"
    short.write_text("short\n")
    short.chmod(0o600)
    keys = _generate_keys(tmp / "keys")
    open_keys = _generate_keys(tmp / "open-keys")
    (open_keys / "incentive-signing.pem").chmod(0o644)
    not_a_cert = tmp / "ca.pem"
    not_a_cert.write_text("not a certificate\n")
    platform = "uplinks:\n  platform: {host: 127.0.0.1, port: 1, tls: {ca_file: %s}}\n"
    sites = {
        "loopback": _SIM_SITE.format(http="{listen: 127.0.0.1:0}", extra=""),
        "public_without_token": _SIM_SITE.format(http="{listen: 0.0.0.0:0}", extra=""),
        "public_with_token": _SIM_SITE.format(http=f"{{listen: 0.0.0.0:0, token_file: {token}}}", extra=""),
        "public_with_short_token": _SIM_SITE.format(http=f"{{listen: 0.0.0.0:0, token_file: {short}}}", extra=""),
        "incentive_keys": _SIM_SITE.format(http="{enabled: false}", extra=_INCENTIVES.format(keys=keys)),
        "incentive_key_readable_by_others": _SIM_SITE.format(
            http="{enabled: false}", extra=_INCENTIVES.format(keys=open_keys)
        ),
        "incentive_keys_missing": _SIM_SITE.format(
            http="{enabled: false}", extra=_INCENTIVES.format(keys=tmp / "no-keys")
        ),
        "platform_tls_ca_not_a_certificate": _SIM_SITE.format(http="{enabled: false}", extra=platform % not_a_cert),
    }
    paths = {}
    for name, text in sites.items():
        path = tmp / f"{name}.yaml"
        path.write_text(text)
        paths[name] = path
    return paths


#: constructed site -> whether it must start (the equivalence alone would also hold if both always failed)
CONSTRUCTED_STARTS = {
    "loopback": True,
    "public_without_token": False,
    "public_with_token": True,
    "public_with_short_token": False,
    "incentive_keys": True,
    "incentive_key_readable_by_others": False,
    "incentive_keys_missing": False,
    "platform_tls_ca_not_a_certificate": False,
}


def _assert_check_matches_run(site: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> bool:
    http = _http_option(site)
    checked = _cli(["check", str(site), "--data-dir", str(data_dir), *http])
    check_err = capsys.readouterr().err
    ran = _cli(["run", str(site), "--data-dir", str(data_dir), "--duration", "1", *http])
    run_err = capsys.readouterr().err
    assert checked in (0, 1), check_err
    assert (checked == 0) == (ran == 0), f"check exit {checked}, run exit {ran}\ncheck: {check_err}\nrun: {run_err}"
    return checked == 0


@pytest.mark.parametrize("site", SHIPPED + GOLDEN, ids=lambda p: str(p.relative_to(REPO)))
def test_check_passes_exactly_the_sites_that_run_starts(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGE_TEST_UNSET_INFLUX_TOKEN", raising=False)  # missing_env_secret's variable
    monkeypatch.setenv("MQTT_HOST", "127.0.0.1")  # the MQTT sample's broker (none listens on its port: an outage)
    monkeypatch.setenv("MQTT_PASSWORD", "sample-password")
    started = _assert_check_matches_run(site, tmp_path / "data", capsys)
    if site in GOLDEN:
        assert not started  # every golden case is broken
    if site.name == "demo.yaml":
        assert started
    # the driver samples start where their files exist (the MQTT sample names /etc/edge-gateway/broker-ca.pem)


@pytest.mark.parametrize("name", sorted(CONSTRUCTED_STARTS))
def test_check_refuses_what_run_refuses_at_start(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _constructed(tmp_path)[name]
    assert _assert_check_matches_run(site, tmp_path / "data", capsys) == CONSTRUCTED_STARTS[name]


def test_public_status_page_without_token_is_refused_by_check_with_its_position(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _constructed(tmp_path)["public_without_token"]
    assert _cli(["check", str(site), "--data-dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert f"{site}:3:" in err and "not loopback: set http.token_file" in err


def test_check_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo generates its keys and data directory on first run; ``check`` only looks."""
    data_dir = tmp_path / "data"
    assert _cli(["check", str(REPO / "firmware_configs" / "sites" / "demo.yaml"), "--data-dir", str(data_dir)]) == 0
    assert not data_dir.exists()


def test_check_reports_a_data_directory_it_cannot_create(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        demo = REPO / "firmware_configs" / "sites" / "demo.yaml"
        assert _cli(["check", str(demo), "--data-dir", str(locked / "data")]) == 1
        assert "cannot create it" in capsys.readouterr().err
    finally:
        locked.chmod(stat.S_IRWXU)


def test_changed_money_settings_are_refused_by_check_as_by_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ledger binds the programme at its first start; ``check --data-dir`` reads it (read-only) as ``run`` does."""
    site = _constructed(tmp_path)["incentive_keys"]
    data_dir = tmp_path / "data"
    assert _cli(["run", str(site), "--data-dir", str(data_dir), "--duration", "1"]) == 0
    assert _cli(["check", str(site), "--data-dir", str(data_dir)]) == 0
    site.write_text(site.read_text().replace("kg_per_kwh: 0.5", "kg_per_kwh: 0.6"))
    capsys.readouterr()
    assert not _assert_check_matches_run(site, data_dir, capsys)
    assert _cli(["check", str(site), "--data-dir", str(data_dir)]) == 1
    assert "differs from epoch 1" in capsys.readouterr().err


def test_a_ledger_of_another_version_is_refused_by_check_as_by_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    site = _constructed(tmp_path)["incentive_keys"]
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    with sqlite3.connect(data_dir / "incentives.db") as db:
        db.execute("CREATE TABLE records (seq INTEGER)")
        db.execute("PRAGMA user_version = 1")
    assert not _assert_check_matches_run(site, data_dir, capsys)
    assert _cli(["check", str(site), "--data-dir", str(data_dir)]) == 1
    assert "written by an older gateway" in capsys.readouterr().err
