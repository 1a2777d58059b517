"""The whole gateway killed with SIGKILL during a TSDB outage, then restarted: every sample the outbox had
committed but not delivered arrives; a resend repeats the same timestamp and value; the broker announces the
death with the gateway's Last Will."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from gateway.outbox import UplinkCursor
from tests.integration.uplinks.common import FAST_DELIVERY, write_site
from tests.services import Mosquitto, VictoriaMetrics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


def start_gateway(site: Path, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", str(site), "--data-dir", str(data_dir), "--http", "off"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )


def undelivered(db_path: Path) -> list[tuple[str, float, int]]:
    """What the killed gateway had committed and the TSDB had not acknowledged: ``(point, value, ts)``."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        positions = dict(db.execute("SELECT kind, seq FROM cursors WHERE name = 'influx'").fetchall())
        cursor = UplinkCursor.from_positions(positions)
        out = []
        for seq, payload in db.execute("SELECT seq, payload FROM telemetry ORDER BY seq"):
            if not cursor.delivered(seq):
                out.extend((p, v, t) for p, v, t, q in orjson.loads(payload) if q != 2 and v is not None)
        return out
    finally:
        db.close()


def wait_until(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def stored(tsdb: VictoriaMetrics) -> dict[tuple[str, int], list[float]]:
    """``(point id, ms) -> values`` in the TSDB (more than one value: a resend)."""
    values: dict[tuple[str, int], list[float]] = {}
    for row in tsdb.export('{__name__=~"energy_meter_.*", test="kill"}'):
        labels = row["metric"]
        point = f"{labels['device']}.{str(labels['__name__']).removeprefix('energy_meter_')}"  # type: ignore[index]
        for ts, value in zip(row["timestamps"], row["values"], strict=True):  # type: ignore[call-overload]
            values.setdefault((point, int(ts)), []).append(float(value))
    return values


def retained_status(broker: Mosquitto) -> dict[str, object]:
    out = subprocess.run(
        ["mosquitto_sub", "-p", str(broker.port), "-t", "kill/tower/gw1/status", "-C", "1", "-W", "5"],
        capture_output=True,
        check=True,
        timeout=10,
    )
    return orjson.loads(out.stdout)  # type: ignore[no-any-return]


def test_sigkill_during_an_outage_loses_nothing_committed(
    tmp_path: Path, tsdb: VictoriaMetrics, broker: Mosquitto
) -> None:
    uplinks = (
        f"  influx: {{url: '{tsdb.url}', org: acme, bucket: kill, extra_tags: {{test: kill}},"
        f" delivery: {FAST_DELIVERY}}}\n"
        f"  platform: {{host: 127.0.0.1, port: {broker.port}, prefix: kill, delivery: {FAST_DELIVERY}}}\n"
    )
    site = write_site(tmp_path, uplinks, poll="0.05s")
    data = tmp_path / "data"
    log = tmp_path / "gateway.log"
    gateway = start_gateway(site, data, log)
    try:
        wait_until(lambda: len(stored(tsdb)) > 20, 20, "first live data in the TSDB")
        assert retained_status(broker)["state"] == "online"
        tsdb.stop()
        time.sleep(1.5)  # the outbox fills while the TSDB is down
        killed_ms = time.time_ns() // 1_000_000
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(10)
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
    will = retained_status(broker)  # the broker published the Last Will: the connection died without a goodbye
    assert (will["state"], will["reason"]) == ("offline", "lost")
    # composed at connect time: it says when the connection began, not when it died
    assert isinstance(will["since"], int) and will["since"] == will["ts"] and will["since"] < killed_ms - 1500
    missing = undelivered(data / "outbox.db")
    assert len(missing) > 100, "the outage should have left committed, undelivered samples"

    tsdb.start()
    gateway = start_gateway(site, data, log)
    try:

        def all_arrived() -> bool:
            have = stored(tsdb)
            return all((p, t // 1_000_000) in have for p, _v, t in missing)

        wait_until(all_arrived, 30, "every committed sample in the TSDB")
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(20) == 0, log.read_text()[-3000:]
        assert retained_status(broker)["reason"] == "stopped"  # a clean stop says goodbye itself
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
    have = stored(tsdb)
    for point, value, ts in missing:
        copies = have[(point, ts // 1_000_000)]
        # a resend carries the same timestamp and the same value, so it is recognisable as a duplicate
        assert all(math.isclose(v, value, rel_tol=1e-12) for v in copies), (point, value, copies)
