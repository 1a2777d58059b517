"""The README's demo, as a user runs it: a real process, real signals, the real store on disk."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.config.site import FIRMWARE_CONFIGS, load_site
from gateway.outbox import decode_samples

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _stored_points(db: Path) -> tuple[set[str], int]:
    """Points in the store and the newest timestamp, read-only while the gateway writes (WAL allows it)."""
    if not db.exists():
        return set(), 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT payload FROM telemetry").fetchall()
    except sqlite3.OperationalError:
        return set(), 0  # schema not created yet
    finally:
        conn.close()
    samples = [s for (payload,) in rows for s in decode_samples(payload)]
    return {s.point for s in samples}, max((s.ts for s in samples), default=0)


def test_demo_produces_every_point_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    registry = load_site(FIRMWARE_CONFIGS / "sites" / "demo.yaml").registry
    # every point a device reads (the building aggregate comes once a minute: tests/unit/test_aggregate.py)
    expected = {point for point, info in registry.items() if info.physical}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--data-dir", str(tmp_path), "--http", "off"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        started = time.monotonic()
        seen: set[str] = set()
        while time.monotonic() - started < 5.0 and not expected <= seen:
            seen, _ = _stored_points(tmp_path / "outbox.db")
            time.sleep(0.1)
        assert expected <= seen, f"missing after 5 s: {sorted(expected - seen)}"

        time.sleep(1.0)
        signalled_ns = time.time_ns()
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = proc.wait(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        _out, err = proc.communicate()
    assert code == 0, err.decode()
    assert elapsed < 2.0
    _, newest = _stored_points(tmp_path / "outbox.db")
    # devices poll every second: the last poll before the signal is in the store, not lost in a queue
    assert signalled_ns - newest < 1.5e9
    assert b"gateway stopped; outbox closed" in err
