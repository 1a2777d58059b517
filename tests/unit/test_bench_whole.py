"""bench/whole.py and its harness: the value check catches what it must, and a short real run delivers and checks.

The short run is the real thing (pymodbus server process, Mosquitto, ``edge-gateway run``), 2 devices x 5 points for
about 12 s; it asserts the last line's keys and that every value arrived right, never a speed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import orjson
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_whole_harness", BENCH / "_whole_harness.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_whole_harness", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


h = _harness()
TS_MS = 1_796_000_000_000  # a whole second; its second % 64 is what a fresh value carries
SECOND = TS_MS // 1000


def _served(unit: int, table: int, index: int, second: int = SECOND) -> float:
    return float(h.served_value(h.point_ident(unit, table, index), second))


def test_every_served_value_is_exact_in_f32() -> None:
    import struct

    for unit, table, index in ((1, 0, 0), (247, 1, 511), (50, 1, 49)):
        for second in (SECOND, SECOND + 63):
            value = _served(unit, table, index, second)
            assert struct.unpack(">f", struct.pack(">f", value))[0] == value


@pytest.mark.parametrize(
    ("value", "bad"),
    [
        (_served(3, 0, 7), 0),  # right point, this second
        (_served(3, 0, 7, SECOND - 2), 0),  # read 2 s before its timestamp: fine
        (_served(3, 0, 7, SECOND + 1), 0),  # clock granularity: a second "ahead"
        (_served(3, 0, 8), 1),  # the neighbouring register's value
        (_served(4, 0, 7), 1),  # the same register of another unit
        (_served(3, 1, 7), 1),  # the input register instead of the holding one
        (_served(3, 0, 7, SECOND - 40), 1),  # stale
        (_served(3, 0, 7) + 0.1, 1),  # not a served value at all (a word-order mix-up lands here)
        ("12.5", 1),
        (True, 1),
        (None, 1),
    ],
)
def test_the_check_tells_right_from_wrong(value: object, bad: int) -> None:
    tally = h.Tally()
    tally.check(3, 0, 7, value, TS_MS)
    assert (tally.delivered, tally.bad) == (1 - bad, bad)


def test_edge_contract_v1_is_counted_and_checked() -> None:
    tally = h.Tally()
    doc = {"v": 1, "seq": 5, "ts": TS_MS, "values": {"h000": _served(2, 0, 0), "i001": _served(2, 1, 1)}}
    h.parse_edge_telemetry("city/bench_site/bench_gw/telemetry/d002", orjson.dumps(doc), tally)
    doc["values"] = {"h000": _served(2, 0, 1)}  # a value of another point under h000
    h.parse_edge_telemetry("city/bench_site/bench_gw/telemetry/d002", orjson.dumps(doc), tally)
    h.parse_edge_telemetry("city/bench_site/bench_gw/telemetry/d002", b"{not json", tally)
    assert (tally.delivered, tally.bad) == (2, 2)


def test_edge_telemetry_v2_reads_are_counted_and_checked() -> None:
    tally = h.Tally()
    doc = {
        "v": 2,
        "seq": 9,
        "reads": [
            {"ts": TS_MS, "values": {"h000": _served(5, 0, 0), "h001": _served(5, 0, 1)}},
            {"ts": TS_MS + 20, "values": {"i000": _served(5, 1, 0), "i001": _served(6, 1, 1)}},
        ],
    }
    h.parse_edge_telemetry("city/bench_site/bench_gw/telemetry/d005", orjson.dumps(doc), tally)
    assert (tally.delivered, tally.bad) == (3, 1)


def test_a_batch_with_full_point_ids_is_read_too() -> None:
    tally = h.Tally()
    doc = [{"ts": TS_MS, "values": {"d001.h002": _served(1, 0, 2), "d009.i000": _served(9, 1, 0)}}]
    h.parse_edge_telemetry("city/bench_site/bench_gw/telemetry", orjson.dumps(doc), tally)
    assert (tally.delivered, tally.bad) == (2, 0)


def test_thingsboard_gateway_api_payload_is_counted_and_checked() -> None:
    tally = h.Tally()
    doc = {"d007": [{"ts": TS_MS, "values": {"h_0": _served(7, 0, 0), "h_2": _served(7, 0, 1), "i_4": 1.0}}]}
    h.parse_tb_telemetry(orjson.dumps(doc), tally)
    assert (tally.delivered, tally.bad) == (2, 1)


async def test_the_outbox_tail_reads_the_gateway_s_stored_rows(tmp_path: Path) -> None:
    """``--no-uplink`` counts what the gateway stored: the tail must read the outbox's own format (five fields since
    samples carry a reason; a tail written for four read nothing and reported 0 delivered)."""
    import time

    from gateway.model import Quality, Sample
    from gateway.outbox import Outbox

    outbox = Outbox(tmp_path / "outbox.db")
    ns = TS_MS * 1_000_000
    await outbox.append(
        [
            Sample("d001.h002", _served(1, 0, 2), ns, Quality.GOOD),
            Sample("d009.i000", _served(9, 1, 0), ns, Quality.GOOD),
            Sample("d002.h001", 12345.0, ns, Quality.GOOD, "wrong on purpose"),
        ]
    )
    await outbox.close()
    tally = h.Tally()
    tail = h.OutboxTail(tmp_path / "outbox.db", tally)
    deadline = time.monotonic() + 5
    while tally.messages == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    tail.close()
    assert (tally.messages, tally.delivered, tally.bad) == (1, 2, 1)


def test_rss_slope_is_least_squares_per_minute() -> None:
    assert h.slope_per_min([(0.0, 100.0), (30.0, 100.5), (60.0, 101.0)]) == pytest.approx(1.0)
    assert h.slope_per_min([(0.0, 50.0)]) == 0.0


@pytest.mark.integration
@pytest.mark.slow
def test_whole_py_runs_the_real_gateway_and_every_value_checks() -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH / "whole.py"),
            "--devices",
            "2",
            "--points",
            "5",
            "--minutes",
            "0.2",
            "--warmup",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    last = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(last) == {
        "cpu_us_per_point",
        "rss_mib",
        "rss_growth_mib_per_min",
        "log_lines_per_min",
        "delivered_per_s",
        "bad_values",
    }
    assert last["bad_values"] == 0, run.stdout
    assert last["delivered_per_s"] > 0, run.stdout
    assert last["rss_mib"] > 0
