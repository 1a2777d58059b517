"""The deployment files are checked by the tools that would reject them on site: ``systemd-analyze verify`` for the
unit, ``bash -n`` and shellcheck for the installer; the Dockerfile and the Grafana dashboard are checked against
the code they depend on (routes, package layout, and the line protocol the InfluxDB uplink really writes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gateway.config.site import FIRMWARE_CONFIGS, load_site
from gateway.model import Quality, Sample
from gateway.uplinks.lineprotocol import LineProtocolEncoder

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "edge-gateway.service"
INSTALLER = DEPLOY / "install-pi.sh"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "edge-gateway-dashboard.json"
#: every shell script a user or CI runs: the installer, the README's two commands, the fresh-machine check, CI
SCRIPTS = [INSTALLER, DEPLOY / "demo.sh", DEPLOY / "check-fresh.sh", REPO / "tests" / "run.sh", REPO / ".ci" / "run"]

pytestmark = pytest.mark.integration


def unit_directives() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def test_unit_has_what_the_issue_requires() -> None:
    unit = unit_directives()
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["Restart"] == ["always"]
    assert float(unit["WatchdogSec"][0]) >= 10
    assert unit["ProtectSystem"] == ["strict"] and unit["NoNewPrivileges"] == ["yes"]
    assert unit["StateDirectory"] == ["edge-gateway"]  # $STATE_DIRECTORY: the gateway's default data dir
    assert unit["User"] == ["edge-gateway"]
    assert any("run /etc/edge-gateway/site.yaml" in line for line in unit["ExecStart"])
    assert "ProcSubset" not in unit  # it would hide /proc/stat and with it every process_* metric


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this checkout's instead of /opt's
    edge_gateway = Path(sys.executable).with_name("edge-gateway")
    assert edge_gateway.exists()
    unit = tmp_path / "edge-gateway.service"
    unit.write_text(UNIT.read_text().replace("/opt/edge-gateway/venv/bin/edge-gateway", str(edge_gateway)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "edge-gateway.service" not in result.stderr, result.stderr  # no warning about our unit either


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_exposure_is_low(tmp_path: Path) -> None:
    edge_gateway = Path(sys.executable).with_name("edge-gateway")
    unit = tmp_path / "edge-gateway.service"
    unit.write_text(UNIT.read_text().replace("/opt/edge-gateway/venv/bin/edge-gateway", str(edge_gateway)))
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for edge-gateway\.service: ([\d.]+)", result.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot rate units offline: {result.stderr.strip()[:200]}")
    assert float(match.group(1)) < 3.0  # systemd calls < 2 "OK", 2-5 "MEDIUM"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.relative_to(REPO).as_posix())
def test_scripts_are_valid_bash_and_executable(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert script.stat().st_mode & 0o111, f"{script.name} must be executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.relative_to(REPO).as_posix())
def test_scripts_are_shellcheck_clean(script: Path) -> None:
    result = subprocess.run(
        ["shellcheck", "--severity=style", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def test_ci_runs_exactly_the_readme_test_command() -> None:
    commands = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert commands == ["./tests/run.sh"]


def test_both_readme_commands_build_the_venv_from_the_system_python() -> None:
    # Debian's /usr/bin/python3 (3.11.2 on Debian 12 and Raspberry Pi OS bookworm) is what users run: the suite must
    # run on it, and python3-venv must be installed for it to create a virtual environment
    for script in (DEPLOY / "demo.sh", REPO / "tests" / "run.sh"):
        text = script.read_text()
        assert "if [ -x /usr/bin/python3 ]; then python=/usr/bin/python3" in text, script
        assert "python3-venv" in text, script
        assert "rebuilding .venv" in text, script
        installs = [line for line in text.splitlines() if "pip install" in line or "apt-get " in line]
        assert installs and not [line for line in installs if " -q" in line], f"{script}: installs must be visible"


def test_check_fresh_installs_only_what_the_readme_promises() -> None:
    text = (DEPLOY / "check-fresh.sh").read_text()
    assert "--variant=minbase --include=python3,git,ca-certificates" in text
    assert "./deploy/demo.sh" in text and "./tests/run.sh" in text
    assert "trap cleanup EXIT" in text
    result = subprocess.run(
        ["bash", str(DEPLOY / "check-fresh.sh"), "--frobnicate"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and "unknown option --frobnicate" in result.stderr
    result = subprocess.run(
        ["bash", str(DEPLOY / "check-fresh.sh"), "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "debootstrap" in result.stdout and "--keep" in result.stdout


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to act as another user")
def test_demo_without_venv_support_names_the_package_in_one_line() -> None:
    # A user without root or passwordless sudo, on a Python without ensurepip (Debian without python3-venv): the
    # demo says in one line what to install and exits 1. A module named ensurepip that fails to import stands in
    # for the missing package; `nobody` stands in for the user. The script runs from a copy in a directory that
    # `nobody` can read (a checkout under /root cannot be); it stops before it needs anything else of the checkout.
    shadow = Path(tempfile.mkdtemp(prefix="no-ensurepip-"))
    try:
        (shadow / "site").mkdir()
        (shadow / "site" / "ensurepip.py").write_text("raise ImportError('python3-venv is not installed')\n")
        (shadow / "checkout" / "deploy").mkdir(parents=True)
        shutil.copy(DEPLOY / "demo.sh", shadow / "checkout" / "deploy" / "demo.sh")
        for path in [shadow, *shadow.rglob("*")]:
            path.chmod(0o755)
        result = subprocess.run(
            [
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "--",
                "env",
                f"PYTHONPATH={shadow / 'site'}",
                "bash",
                str(shadow / "checkout" / "deploy" / "demo.sh"),
                "--duration",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=shadow,
        )
    finally:
        shutil.rmtree(shadow)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "without python3-venv" in lines[0]
    assert lines[0].endswith(("sudo apt-get install -y python3-venv", "su -c 'apt-get install -y python3-venv'"))


def test_install_script_refuses_without_root_or_with_bad_options() -> None:
    result = subprocess.run(["bash", str(INSTALLER), "--frobnicate"], capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "unknown option --frobnicate" in result.stderr
    result = subprocess.run(["bash", str(INSTALLER), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "--site FILE" in result.stdout


def test_installer_and_unit_agree_on_paths() -> None:
    script = INSTALLER.read_text()
    unit = UNIT.read_text()
    assert "PREFIX=/opt/edge-gateway" in script and "/opt/edge-gateway/venv/bin/edge-gateway" in unit
    assert "CONF_DIR=/etc/edge-gateway" in script and "/etc/edge-gateway/site.yaml" in unit
    assert "SERVICE_USER=edge-gateway" in script
    assert "EDGE_GATEWAY_CONFIGS=/opt/edge-gateway/firmware_configs" in unit


def test_dockerfile_runs_unprivileged_and_copies_what_exists() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    final_stage = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")) :]
    users = [line.split()[1] for line in final_stage if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _target = line.split()[1:]
            for source in sources:
                assert (REPO / source).exists(), f"{line}: {source} missing from the repository"
    healthcheck = next(line for line in lines if line.startswith('CMD ["python"') or "healthz" in line)
    assert "/healthz" in healthcheck
    assert "STATE_DIRECTORY=/var/lib/edge-gateway" in DOCKERFILE.read_text()
    # the page's static files ship in the wheel only because gateway/http/static is a package
    assert (REPO / "gateway" / "http" / "static" / "__init__.py").exists()


def test_grafana_dashboard_queries_series_the_uplink_writes() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    site = load_site(FIRMWARE_CONFIGS / "sites" / "demo.yaml")
    identity = site.config.gateway
    encoder = LineProtocolEncoder(
        site.registry, common_tags={"site": identity.site, "gateway": identity.id}, include_personal=False
    )
    lines = encoder.encode([Sample(point, 1.0, 1, Quality.GOOD) for point in site.registry]).decode().splitlines()
    written: set[tuple[str, str]] = set()
    for line in lines:
        series, fields, _ts = line.split(" ")
        measurement, *tags = series.split(",")
        assert {t.split("=")[0] for t in tags} >= {"device", "site", "gateway"}
        written.update((measurement, field.split("=")[0]) for field in fields.split(","))

    queried: set[tuple[str, str]] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found = re.findall(r'r\._measurement == "([^"]+)" and r\._field == "([^"]+)"', target["query"])
            assert found, f"panel {panel['title']!r} filters on no measurement/field"
            assert "r.site ==" in target["query"] and "r.gateway ==" in target["query"]
            queried.update(pair for pair in found if not pair[0].startswith("$"))
    assert queried, "the dashboard queries nothing"
    assert queried <= written, f"panels query series the gateway never writes: {sorted(queried - written)}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables >= {"bucket", "site", "gateway", "device", "measurement", "field"}
    assert dashboard["__inputs"][0]["pluginId"] == "influxdb"
