"""A real ``edge-gateway demo`` process with its status server on a free port, for the ops integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services import free_port

REPO = Path(__file__).resolve().parents[3]


@dataclass
class RunningGateway:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def start_demo(tmp: Path, *, extra_env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> RunningGateway:
    port = free_port()
    log = tmp / "gateway.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "demo",
                "--http",
                f"127.0.0.1:{port}",
                "--data-dir",
                str(tmp / "data"),
                "--duration",
                "120",  # a safety net: the fixture stops it long before
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    return RunningGateway(f"http://127.0.0.1:{port}", proc, log)


def wait_ready(gateway: RunningGateway, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.proc.poll() is not None:
            raise RuntimeError(f"the demo exited early:\n{gateway.log.read_text()}")
        try:
            with urllib.request.urlopen(f"{gateway.url}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the demo never became ready:\n{gateway.log.read_text()}")


def stop(gateway: RunningGateway) -> int:
    if gateway.proc.poll() is None:
        gateway.proc.send_signal(signal.SIGTERM)
    try:
        return gateway.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        gateway.proc.kill()
        gateway.proc.wait()
        raise


@pytest.fixture
def demo_gateway(tmp_path: Path) -> Iterator[RunningGateway]:
    gateway = start_demo(tmp_path)
    try:
        wait_ready(gateway)
        yield gateway
    finally:
        stop(gateway)
