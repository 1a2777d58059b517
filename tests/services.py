"""Real services for integration tests: a Mosquitto broker and a VictoriaMetrics TSDB, each on a free port.

Each service can be stopped and started again on the same port (outage tests), and is always stopped at the end
of the session. Nothing here is faked: the binaries are Debian's ``mosquitto`` and ``victoria-metrics``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class _Service:
    binary = ""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.binary}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "service.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        try:
            self.wait_ready()
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{self.binary} did not start; log:\n{self.log.read_text(errors='replace')}") from None

    def wait_ready(self) -> None:
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients (no clean disconnect, no flush)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Mosquitto(_Service):
    """A broker with persistence on, so QoS 1 messages for persistent sessions survive a restart."""

    binary = "mosquitto"

    def command(self) -> list[str]:
        conf = self.dir / "mosquitto.conf"
        # log_dest stdout: as root mosquitto drops to its own user and could not write a log file here
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 1000000\n"
            "max_inflight_messages 1000\n"
            "log_dest stdout\n"
            "log_type error\nlog_type warning\n"
            "user root\n"
        )
        return [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)]


class VictoriaMetrics(_Service):
    """Accepts InfluxDB's ``/api/v2/write``; read back with ``export``."""

    binary = "victoria-metrics"

    def command(self) -> list[str]:
        return [
            shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics",
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-storageDataPath={self.dir / 'data'}",
            "-retentionPeriod=100y",
            "-search.disableCache",
            "-loggerLevel=ERROR",
        ]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=0.5) as resp:
                if resp.status == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError("victoria-metrics not healthy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def flush(self) -> None:
        """Make recent writes searchable now (VictoriaMetrics buffers them for about a second)."""
        with urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=5):
            pass

    def export(self, match: str) -> list[dict[str, object]]:
        """All samples of series matching a PromQL selector, e.g. ``{__name__=~"zone_.*"}``."""
        import json
        import urllib.parse

        self.flush()
        query = urllib.parse.urlencode({"match[]": match})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{query}", timeout=10) as resp:
            return [json.loads(line) for line in resp.read().splitlines() if line.strip()]
