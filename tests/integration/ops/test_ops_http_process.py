"""The status server in the real process, as an operator meets it: ``status`` and ``tail`` against a running demo,
and a refused public bind that ends with one clear line, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.ops.conftest import REPO, RunningGateway
from tests.services import free_port

pytestmark = pytest.mark.integration


def edge_gateway(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
        check=False,
    )


def test_status_and_tail_against_a_running_demo(demo_gateway: RunningGateway) -> None:
    status = edge_gateway("status", "--url", demo_gateway.url)
    assert status.returncode == 0, status.stderr
    assert "Demo Tower, simulated" in status.stdout and "READY" in status.stdout
    assert "Devices (8)" in status.stdout and "zone3.co2" in status.stdout

    tail = edge_gateway("tail", "zone1.*", "--url", demo_gateway.url, "--duration", "2.5")
    assert tail.returncode == 0, tail.stderr
    lines = tail.stdout.splitlines()
    assert {line.split()[1] for line in lines} == {
        "zone1.temperature",
        "zone1.co2",
        "zone1.occupancy",
        "zone1.humidity",
    }


def test_a_public_bind_without_token_is_refused_with_one_clear_line(tmp_path: Path) -> None:
    port = free_port()
    result = edge_gateway("demo", "--http", f"0.0.0.0:{port}", "--data-dir", str(tmp_path), "--duration", "10")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr
    assert f"--http 0.0.0.0:{port}: the status page would listen on 0.0.0.0, which is not loopback" in result.stderr
    assert "set http.token_file" in result.stderr


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    result = edge_gateway(
        "--log-format", "json", "demo", "--http", "off", "--data-dir", str(tmp_path), "--duration", "1"
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert any(r["msg"].startswith("gateway demo_tower/demo_gw up") for r in records)
