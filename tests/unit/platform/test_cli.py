"""``edge-gateway platform``: usage errors say what is wrong in one line; ``report`` prints the progress as JSON."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from gateway.cli import main
from gateway.platform.messages import parse
from gateway.platform.progress import Progress


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mqtt", "nohost", "--tsdb", "http://127.0.0.1:1"], "is not HOST:PORT"),
        (["--nats", "nats://127.0.0.1:1", "--tsdb", "ftp://x"], "is not an http(s) URL"),
        (["--nats", "nats://127.0.0.1:1", "--tsdb", "http://x", "--batch", "0"], "--batch must be 1 or more"),
    ],
)
def test_receive_refuses_bad_arguments_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "keys").mkdir()
    code = main(["platform", "receive", "--db", str(tmp_path / "p.db"), "--keys", str(tmp_path / "keys"), *args])
    err = capsys.readouterr().err
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_receive_needs_a_keys_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["platform", "receive", "--nats", "nats://127.0.0.1:1", "--db", str(tmp_path / "p.db"),
                 "--keys", str(tmp_path / "missing"), "--tsdb", "http://127.0.0.1:1"])  # fmt: skip
    assert code == 1 and "is not a directory" in capsys.readouterr().err


def test_report_prints_counters_gaps_and_quarantine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "data" / "progress.db"
    progress = Progress(db, keys=lambda _gateway: None)
    items = [
        (b'{"v": 1, "seq": 1, "ts": 1000, "values": {"power_kw": 1.5}}', "city/tower/gw1/telemetry/m1"),
        (b'{"v": 1, "seq": 3, "ts": 3000, "values": {"power_kw": 1.5}}', "city/tower/gw1/telemetry/m1"),
        (b'{"v": 1, "seq": "x"}', "city/tower/gw1/telemetry/m1"),
    ]
    progress.commit([(parse(topic, payload, prefix="city"), payload) for payload, topic in items])
    progress.close()
    assert main(["platform", "report", "--db", str(db)]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["counters"]["telemetry"] == 2
    assert report["gateways"]["tower/gw1"]["telemetry"] == {"first_seq": 1, "last_seq": 3, "gaps": 1}
    assert report["quarantine"] == {"schema": 1}
    assert report["recent_quarantine"][0]["topic"] == "city/tower/gw1/telemetry/m1"


def test_report_of_a_missing_database_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["platform", "report", "--db", str(tmp_path / "none.db")]) == 1
    assert "does not exist" in capsys.readouterr().err
