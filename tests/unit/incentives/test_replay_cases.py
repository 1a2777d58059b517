"""Golden folders for ``edge-gateway incentives test``: one per fault class (tests/cases/incentives_replay/<case>/).

Each ``readings.csv`` says in its first line what it shows; ``expected.out`` is what the command prints: one line per
record (real account ids: the command runs on the gateway) and the summary. Signatures and pseudonyms are left out of
that view because the command signs with throw-away keys; ``--jsonl`` output is checked with ``verify`` instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main as cli_main

CASES = Path(__file__).resolve().parents[2] / "cases" / "incentives_replay"
SITE = CASES / "site.yaml"


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_replay_prints_the_expected_records(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["incentives", "test", str(SITE), "--data", str(CASES / case / "readings.csv")]) == 0
    printed = capsys.readouterr().out
    assert printed == (CASES / case / "expected.out").read_text(encoding="utf-8")


def test_replayed_records_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    assert cli_main(["keys", "generate", "--out", str(keys)]) == 0
    for case in ("clean", "bad_zero", "frozen", "clock_step", "late"):
        capsys.readouterr()
        readings = CASES / case / "readings.csv"
        assert cli_main(["incentives", "test", str(SITE), "--data", str(readings), "--jsonl", "--keys", str(keys)]) == 0
        records = tmp_path / f"{case}.jsonl"
        records.write_text(capsys.readouterr().out, encoding="utf-8")
        public = keys / "incentive-signing.pub.pem"
        assert cli_main(["incentives", "verify", str(records), "--public-key", str(public)]) == 0, case


def test_a_bad_readings_file_is_reported_row_by_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("time,point,value\n2026-11-02T00:00,apt1.energy_kwh,1\nyesterday,apt1.energy_kwh,2\nx,y\n")
    assert cli_main(["incentives", "test", str(SITE), "--data", str(bad)]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[0] for line in errors if line.startswith(str(bad))] == [f"{bad}:3:1", f"{bad}:4:1"]
