"""Every documented way ``edge-gateway run``/``demo`` ends, driven as a real process on the interpreter the suite runs
on (tests/run.sh builds it from Debian's /usr/bin/python3, 3.11.2 on Debian 12): the exit code the README promises,
the one line that says why, and never a traceback or an ExceptionGroup.

Exit codes (README, gateway/cli.py): 0 ok, 1 invalid input, 3 runtime failure.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.ops.conftest import REPO
from tests.services import free_port

pytestmark = pytest.mark.integration

SITE = """\
version: 1
gateway:
  id: gw1
  site: tower
http: {enabled: false}
devices:
  - {id: meter1, driver: simulator, profile: sim-energy-meter, poll: 1s}
"""


class Gateway:
    """``python -m gateway ARGS`` with its stderr collected line by line as it comes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                self._reader.join(5)
                if any(text in line for line in self.lines):
                    return
                raise AssertionError(f"exited {self.proc.returncode} before {text!r}:\n{self.stderr}")
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} within {timeout} s:\n{self.stderr}")

    def finish(self, timeout: float = 30.0) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        return code


def run_to_end(*args: str, timeout: float = 30.0) -> tuple[int, str]:
    gateway = Gateway(*args)
    return gateway.finish(timeout), gateway.stderr


def assert_no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "ExceptionGroup" not in stderr, stderr


def one_line_with(stderr: str, text: str) -> str:
    lines = [line for line in stderr.splitlines() if text in line]
    assert len(lines) == 1, f"{text!r} on {len(lines)} lines:\n{stderr}"
    return lines[0]


# -- start refused: invalid input, exit 1 ---------------------------------------------------------------------------


def test_a_config_error_at_start_is_file_line_col_and_exit_1(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(SITE.replace("poll: 1s}", "poll: 1s, pol: 5s}"))
    code, stderr = run_to_end("run", str(site), "--data-dir", str(tmp_path / "data"), "--duration", "20")
    assert code == 1, stderr
    assert_no_traceback(stderr)
    assert stderr.splitlines()[0].startswith(f"{site}:7:"), stderr
    assert "unknown key 'pol'" in one_line_with(stderr, "unknown key")
    one_line_with(stderr, "1 error(s); not started")
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_a_rule_error_found_by_the_supervisor_at_start_is_exit_1(tmp_path: Path) -> None:
    # rule files are loaded inside the supervisor's start-up (not by the site loader): the same one-line report
    (tmp_path / "bad.yaml").write_text(
        "version: 1\nrules:\n  - id: r1\n    when: meter1.power_kw > 1 and meter1.powr_kw < 5\n"
        "    then:\n      - publish: {topic: alerts/r1, payload: {x: 1}}\n"
    )
    site = tmp_path / "site.yaml"
    site.write_text(SITE + "rules: [bad.yaml]\n")
    code, stderr = run_to_end("run", str(site), "--data-dir", str(tmp_path / "data"), "--duration", "20")
    assert code == 1, stderr
    assert_no_traceback(stderr)
    assert one_line_with(stderr, "unknown point 'meter1.powr_kw'").startswith(f"{tmp_path / 'bad.yaml'}:4:")


def test_a_public_bind_without_token_is_exit_1_with_one_line(tmp_path: Path) -> None:
    # refused inside the supervisor's TaskGroup: the path that printed an ExceptionGroup on Python 3.11.2
    port = free_port()
    code, stderr = run_to_end("demo", "--http", f"0.0.0.0:{port}", "--data-dir", str(tmp_path), "--duration", "20")
    assert code == 1, stderr
    assert_no_traceback(stderr)
    line = one_line_with(stderr, "which is not loopback")
    assert f"--http 0.0.0.0:{port}: the status page would listen on 0.0.0.0" in line
    assert "set http.token_file" in line


# -- runtime failures: exit 3 ---------------------------------------------------------------------------------------


def test_a_status_port_in_use_is_exit_3_with_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr = run_to_end(
            "demo", "--http", f"127.0.0.1:{port}", "--data-dir", str(tmp_path), "--duration", "20"
        )
    assert code == 3, stderr
    assert_no_traceback(stderr)
    assert "gateway failed: status page cannot listen on" in one_line_with(stderr, f"127.0.0.1:{port}")


def test_a_data_directory_that_cannot_be_created_is_exit_3(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    code, stderr = run_to_end("demo", "--http", "off", "--data-dir", str(blocker), "--duration", "20")
    assert code == 3, stderr
    assert_no_traceback(stderr)
    assert "gateway failed: cannot create data directory" in one_line_with(stderr, str(blocker))


def test_an_outbox_that_cannot_be_opened_is_exit_3(tmp_path: Path) -> None:
    (tmp_path / "outbox.db").mkdir()  # what a corrupt or unreadable store looks like to SQLite: cannot open
    code, stderr = run_to_end("demo", "--http", "off", "--data-dir", str(tmp_path), "--duration", "20")
    assert code == 3, stderr
    assert_no_traceback(stderr)
    assert "gateway failed: cannot open outbox" in one_line_with(stderr, "cannot open outbox")


def test_a_stop_while_the_disk_refuses_writes_is_exit_3_in_seconds(tmp_path: Path) -> None:
    # A real refusal by the kernel, no fake: a file-size limit on the process (RLIMIT_FSIZE) makes every write past
    # 256 KiB fail with EFBIG (Python ignores SIGXFSZ), which SQLite reports as a disk I/O error. The gateway holds
    # the data back while it runs; on SIGTERM it retries for a short grace, then gives up, counts and says so.
    gateway = Gateway("demo", "--http", "off", "--data-dir", str(tmp_path), "--duration", "60")
    try:
        limit = 256 * 1024
        resource.prlimit(gateway.proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
        gateway.wait_for("gateway demo_tower/demo_gw up")
        gateway.wait_for("outbox write failed")
        gateway.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
    finally:
        code = gateway.finish(timeout=20)
    elapsed = time.monotonic() - signalled
    stderr = gateway.stderr
    assert code == 3, stderr
    assert elapsed < 10, f"stop took {elapsed:.1f} s:\n{stderr}"
    assert_no_traceback(stderr)
    assert "records not stored" in one_line_with(stderr, "stopped with the store failing")
    one_line_with(stderr, "gateway.outbox: outbox write failed")  # the fault itself: logged once, not once per batch


# -- a clean stop: exit 0 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_cleanly_with_exit_0(tmp_path: Path, sig: signal.Signals) -> None:
    gateway = Gateway("demo", "--http", "off", "--data-dir", str(tmp_path), "--duration", "60")
    try:
        gateway.wait_for("gateway demo_tower/demo_gw up")
        time.sleep(0.5)
        gateway.proc.send_signal(sig)
        signalled = time.monotonic()
    finally:
        code = gateway.finish(timeout=20)
    elapsed = time.monotonic() - signalled
    stderr = gateway.stderr
    assert code == 0, stderr
    assert elapsed < 5, f"stop took {elapsed:.1f} s"
    assert_no_traceback(stderr)
    assert "ERROR" not in stderr, stderr
    one_line_with(stderr, "gateway stopped; outbox closed")


def test_duration_ends_the_run_with_exit_0(tmp_path: Path) -> None:
    code, stderr = run_to_end("demo", "--http", "off", "--data-dir", str(tmp_path), "--duration", "1.5")
    assert code == 0, stderr
    assert_no_traceback(stderr)
    one_line_with(stderr, "gateway stopped; outbox closed")
