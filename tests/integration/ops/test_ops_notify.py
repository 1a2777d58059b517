"""The gateway as systemd runs it: a real ``edge-gateway demo`` process under a fake ``$NOTIFY_SOCKET`` sends READY
once it is up, then WATCHDOG periodically, then STOPPING on SIGTERM."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.ops.conftest import REPO

pytestmark = pytest.mark.integration


def test_ready_then_periodic_watchdog_then_stopping(tmp_path: Path) -> None:
    directory = Path(tempfile.mkdtemp(prefix="sdn-"))  # short: unix socket paths are limited to 107 bytes
    path = directory / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(10)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "NOTIFY_SOCKET": str(path),
        "WATCHDOG_USEC": "400000",  # WatchdogSec=0.4s: a ping every 0.2 s
    }
    env.pop("WATCHDOG_PID", None)
    log_path = tmp_path / "gateway.log"
    command = [sys.executable, "-m", "gateway", "demo", "--http", "off", "--duration", "60"]
    command += ["--data-dir", str(tmp_path / "data")]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            command,
            env=env,
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    messages: list[tuple[float, str]] = []
    try:
        while len([m for _, m in messages if m == "WATCHDOG=1"]) < 8:
            messages.append((time.monotonic(), listener.recv(4096).decode()))
        proc.send_signal(signal.SIGTERM)
        while messages[-1][1] != "STOPPING=1":
            messages.append((time.monotonic(), listener.recv(4096).decode()))
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
        path.unlink(missing_ok=True)
        directory.rmdir()

    first = messages[0][1].splitlines()
    assert first[0] == "READY=1", messages[:3]
    assert f"MAINPID={proc.pid}" in first
    assert sum(1 for _, m in messages if m.startswith("READY=1")) == 1
    pings = [t for t, m in messages if m == "WATCHDOG=1"]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 0.4, gaps  # always inside WatchdogSec, or systemd would have killed it
    assert messages[-1][1] == "STOPPING=1"
    log = log_path.read_text()
    assert "gateway demo_tower/demo_gw up" in log and "gateway stopped; outbox closed" in log
