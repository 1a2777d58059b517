"""One gateway process per data directory, with real processes: the second is refused with one line (exit 3), the
first keeps running, and a holder killed with SIGKILL leaves the lock free."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _command(data: Path, duration: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "demo", "--http", "off", "--data-dir", str(data), "--duration", duration]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _wait_for_line(log: Path, proc: subprocess.Popen[bytes], text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"the first gateway exited early:\n{log.read_text(errors='replace')}"
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} within {timeout}s:\n{log.read_text(errors='replace')}")


def test_a_second_gateway_on_one_data_dir_exits_3_with_one_line_and_the_lock_survives_no_sigkill(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    log = tmp_path / "first.log"
    with log.open("wb") as out:
        first = subprocess.Popen(_command(data, "120"), stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    try:
        _wait_for_line(log, first, "gateway demo_tower/demo_gw up")
        assert (data / "gateway.lock").read_text().strip() == str(first.pid)

        second = subprocess.run(
            _command(data, "10"), capture_output=True, text=True, timeout=60, env=_env(), cwd=REPO, check=False
        )
        assert second.returncode == 3, second.stderr
        lines = second.stderr.splitlines()
        assert len(lines) == 1, second.stderr
        assert "Traceback" not in second.stderr
        assert f"data directory {data} is in use by another gateway process (PID {first.pid})" in lines[0]

        # the first one did not notice: still running, still storing, nothing logged about the attempt
        size_before = (data / "outbox.db-wal").stat().st_size + (data / "outbox.db").stat().st_size
        time.sleep(1.5)
        assert first.poll() is None
        size_after = (data / "outbox.db-wal").stat().st_size + (data / "outbox.db").stat().st_size
        assert size_after != size_before
        assert "ERROR" not in log.read_text(errors="replace")

        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)

        third = subprocess.run(
            _command(data, "1"), capture_output=True, text=True, timeout=60, env=_env(), cwd=REPO, check=False
        )
        assert third.returncode == 0, third.stderr
        assert "in use by another gateway" not in third.stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=10)
