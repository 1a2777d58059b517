"""Tamper tests for ``incentives verify``: each kind of tampering is reported, a clean stream passes; and the CLI."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.cli import main
from gateway.incentives.record import load_public_key, sign
from gateway.incentives.stage import IncentiveStage
from gateway.incentives.verify import verify_lines
from tests.unit.incentives.helpers import MIN, T0, make_site, reading

Records = list[dict[str, Any]]


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> tuple[Records, Path]:
    """Eight real records from a stage (two accounts, four intervals) and the public key that signed them."""
    tmp = tmp_path_factory.mktemp("ledger")
    stage = IncentiveStage.open(make_site(tmp), tmp / "data")
    try:
        events = []
        for minute in range(62):
            ts = T0 + minute * MIN
            events += stage.process(
                [
                    reading("apt1.energy_kwh", ts, 100 + minute * 0.02),
                    reading("apt2.energy_kwh", ts, 50 + minute * 0.04),
                ]
            )
    finally:
        stage.close()
    assert len(events) == 8
    return [e.body for e in events], tmp / "data" / "keys" / "signing.pub.pem"


def _lines(records: Records) -> list[bytes]:
    return [orjson.dumps(r) for r in records]


def _change_figure(records: Records) -> Records:
    records[3] = {**records[3], "saving_kwh": "0.400000"}
    return records


def _remove(records: Records) -> Records:
    del records[4]
    return records


def _reorder(records: Records) -> Records:
    records[2], records[3] = records[3], records[2]
    return records


def _replay(records: Records) -> Records:
    return [*records, records[1]]


def _change_meter_reading(records: Records) -> Records:
    meters = [{**records[0]["meters"][0], "end": {"ts": "2026-11-02T00:15:00Z", "kwh": "100.100000"}}]
    records[0] = {**records[0], "meters": meters}
    return records


TAMPERING: list[tuple[str, Callable[[Records], Records], list[str]]] = [
    ("changed figure", _change_figure, ["line 4 (seq 4, inc_", "bad signature"]),
    ("changed meter reading", _change_meter_reading, ["line 1 (seq 1, inc_", "bad signature"]),
    ("removed record", _remove, ["gap: seq 5 missing (1 record(s))"]),
    ("reordered pair", _reorder, ["line 4 (seq 3, inc_", "out of order, seq 3 comes after seq 4"]),
    ("replayed record", _replay, ["line 9 (seq 2, inc_", "replayed record, identical to line 2"]),
]


def test_a_clean_stream_verifies(issued: tuple[Records, Path]) -> None:
    records, public = issued
    report = verify_lines(_lines(records), [load_public_key(public)])
    assert report.problems == []
    assert (report.records, report.first_seq, report.last_seq) == (8, 1, 8)


@pytest.mark.parametrize(("name", "tamper", "expected"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_each_tampering_is_reported(
    issued: tuple[Records, Path], name: str, tamper: Callable[[Records], Records], expected: list[str]
) -> None:
    records, public = issued
    report = verify_lines(_lines(tamper([dict(r) for r in records])), [load_public_key(public)])
    assert len(report.problems) == 1, report.problems
    assert all(fragment in report.problems[0] for fragment in expected), report.problems


def test_a_wrong_key_is_reported_once_with_both_key_ids(issued: tuple[Records, Path]) -> None:
    records, _ = issued
    other = Ed25519PrivateKey.generate().public_key()
    report = verify_lines(_lines(records), [other])
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"8 record(s) signed by key {records[0]['key_id']}, not by the given key")


def test_a_record_resigned_by_another_key_breaks_signature_not_just_key_id(issued: tuple[Records, Path]) -> None:
    records, public = issued
    forged = {**records[5], "saving_kwh": "9.000000"}
    forged["signature"] = sign(forged, Ed25519PrivateKey.generate())  # claims the real key_id
    tampered = [*records[:5], forged, *records[6:]]
    problems = verify_lines(_lines(tampered), [load_public_key(public)]).problems
    assert problems == [f"line 6 (seq 6, {forged['id']}): bad signature: the record was changed after it was signed"]


def test_a_signed_but_inconsistent_record_is_reported(issued: tuple[Records, Path], tmp_path: Path) -> None:
    """A gateway bug signs wrong figures as readily as right ones: the arithmetic is checked too."""
    key = Ed25519PrivateKey.generate()
    record = {**issued[0][0], "prev_hash": "0" * 64, "seq": 1, "co2e_kg": "1.000000", "key_id": "x"}
    from gateway.incentives.record import key_id

    record["key_id"] = key_id(key.public_key())
    record["signature"] = sign(record, key)
    problems = verify_lines([orjson.dumps(record)], [key.public_key()]).problems
    assert len(problems) == 1 and "co2e_kg 1.000000 is not energy_kwh x emission factor" in problems[0]


def test_garbage_lines_and_event_envelopes(issued: tuple[Records, Path]) -> None:
    records, public = issued
    envelope = orjson.dumps({"id": records[0]["id"], "type": "incentive", "subject": "s", "ts": 1, "body": records[0]})
    problems = verify_lines(
        [envelope, b"{not json", b"[1]", b"", orjson.dumps({"schema": 1})], [load_public_key(public)]
    )
    assert problems.problems == [
        "line 2: not valid JSON",
        "line 3: not a JSON object",
        "line 5: field 'schema' has the wrong type",
    ]


# -- the commands ---------------------------------------------------------------------------------------------


def test_cli_verify_exit_codes_and_one_line_per_problem(
    issued: tuple[Records, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records, public = issued
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(b"\n".join(_lines(records)) + b"\n")
    assert main(["incentives", "verify", str(clean), "--public-key", str(public)]) == 0
    assert capsys.readouterr().out.startswith("ok: 8 record(s), seq 1..8")

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(_lines(_replay(_remove([dict(r) for r in records])))) + b"\n")
    assert main(["incentives", "verify", str(bad), "--public-key", str(public)]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert "FAILED: 2 problem(s)" in captured.err


def test_cli_verify_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("hello")
    assert main(["incentives", "verify", str(tmp_path / "none.jsonl"), "--public-key", str(not_a_key)]) == 1
    assert "is not a PEM public key" in capsys.readouterr().err


def test_keys_generate_writes_private_files_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"
    assert main(["keys", "generate", "--out", str(out)]) == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {
        "incentive-signing.pem": 0o600,
        "incentive-signing.pub.pem": 0o600,
        "incentive-pseudonym.key": 0o600,
    }
    assert load_public_key(out / "incentive-signing.pub.pem") is not None
    assert len((out / "incentive-pseudonym.key").read_text().strip()) == 64
    capsys.readouterr()
    assert main(["keys", "generate", "--out", str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_a_duplicate_key_in_front_of_the_signed_members_is_reported() -> None:
    """orjson keeps the last of two equal keys (the signed one), a first-wins reader the forged one: reject both."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gateway.incentives.record import GENESIS_HASH, SCHEMA_ID, key_id, sign
    from gateway.incentives.verify import verify_lines

    private = Ed25519PrivateKey.generate()
    public = private.public_key()
    record = {
        "schema": SCHEMA_ID,
        "id": "r1",
        "seq": 1,
        "prev_hash": GENESIS_HASH,
        "account": "acc",
        "interval": {},
        "complete": True,
        "status": "no_saving",
        "meters": [{"kwh": "1.000000"}],
        "energy_kwh": "1.000000",
        "saving_kwh": "0.000000",
        "emission_factor_kg_per_kwh": "0.5",
        "co2e_kg": "0.500000",
        "co2e_saved_kg": "0.000000",
        "key_id": key_id(public),
        "baseline": None,
    }
    record["signature"] = sign(record, private)
    line = orjson.dumps(record).decode()
    assert verify_lines([line], [public]).ok
    forged = '{"saving_kwh":"999.000000","status":"saving",' + line[1:]
    report = verify_lines([forged], [public])
    assert not report.ok
    assert report.problems == ["line 1: duplicate JSON key 'status'"]
