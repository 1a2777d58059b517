"""Fixtures of the Modbus integration tests: a real pymodbus server process (TCP or RTU) and a socat pty pair."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import free_port, wait_for_port

SERVER = Path(__file__).with_name("modbus_server.py")


class ServerProcess:
    """``modbus_server.py`` in its own process; ``kill()`` and ``start()`` again to simulate a power cycle."""

    def __init__(self, *args: str, port: int | None = None) -> None:
        self.args = list(args)
        self.port = port
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        where = ["--tcp", str(self.port)] if self.port else []
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), *where, *self.args], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.kill()
            raise RuntimeError(f"modbus server did not start: {line!r}")
        if self.port:
            wait_for_port(self.port, timeout=5)

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        self.proc = None


@pytest.fixture
def modbus_servers() -> Iterator[list[ServerProcess]]:
    """Servers started by a test; all are killed when it ends."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.kill()


@pytest.fixture
def tcp_server(modbus_servers: list[ServerProcess]):  # type: ignore[no-untyped-def]
    def start(*args: str) -> ServerProcess:
        server = ServerProcess(*args, port=free_port())
        modbus_servers.append(server)
        server.start()
        return server

    return start


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two connected pseudo-terminals: the gateway opens one end, the RTU server the other."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.fail("socat is not installed (Debian package socat)")
    a, b = tmp_path / "gateway", tmp_path / "device"
    proc = subprocess.Popen([socat, f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while not (a.exists() and b.exists()):
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("socat did not create the pty pair")
        time.sleep(0.01)
    try:
        yield str(a), str(b)
    finally:
        proc.kill()
        proc.wait()
