"""Restart test: SIGKILL the ledger mid-interval, or right after issuing and before the outbox; after restart each
account-interval is issued exactly once, with the id, sequence number and bytes an uninterrupted run gives it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.cli import main as cli_main
from tests.unit.incentives.helpers import write_site

REPO = Path(__file__).resolve().parents[3]
LAST = 130  # 65 minutes of readings every 30 s: four 15-minute intervals close
INCENTIVES = """
interval: 15min
max_gap: 5min
settle: 1min
max_delay: 30min
baseline: {{method: fixed, kwh: 0.3}}
emission_factor: {{kg_per_kwh: 0.5703}}
max_power_kw: 40
signing_key_file: {keys}/incentive-signing.pem
pseudonym_key_file: {keys}/incentive-pseudonym.key
accounts:
  - {{id: "ACC-0001", meters: [apt1.energy_kwh]}}
  - {{id: "ACC-0002", meters: [apt2.energy_kwh]}}
"""


def _child(site: Path, data: Path, outbox: Path, first: int, *extra: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "tests.unit.incentives.restart_child", str(site), str(data), str(outbox)]
    return subprocess.Popen([*args, str(first), str(LAST), *extra], cwd=REPO, stdout=subprocess.PIPE, text=True)


def _run_to_end(site: Path, data: Path, outbox: Path, first: int) -> None:
    child = _child(site, data, outbox, first)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0, out
    assert out.splitlines()[-1] == f"fed {LAST}"


def _outbox(path: Path) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
    return [body for body in lines if "kind" in body]  # records; checkpoints are checked elsewhere


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Shared keys, the site file, and the records of an uninterrupted reference run."""
    root = tmp_path_factory.mktemp("restart")
    assert cli_main(["keys", "generate", "--out", str(root / "keys")]) == 0
    site = write_site(root, INCENTIVES.format(keys=root / "keys"))
    reference = root / "reference.jsonl"
    _run_to_end(site, root / "reference-data", reference, 0)
    records = _outbox(reference)
    # the genesis record, then 15-minute intervals: apt1 from 00:00 (4 closed), apt2 from 00:15 (its first reading
    # is at 00:00:02, so 00:15 is the first edge it can interpolate): 3 closed
    assert [r["kind"] for r in records] == ["epoch"] + ["interval"] * 7
    assert [r["seq"] for r in records] == list(range(1, 9))
    return root, site, records


def _dedupe_checked(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Deliveries may repeat (the outbox and the platform dedupe by id) but a repeat must be byte-identical."""
    by_id: dict[str, dict[str, Any]] = {}
    for record in records:
        if record["id"] in by_id:
            assert by_id[record["id"]] == record, "a replayed record differs from the first delivery"
        by_id.setdefault(record["id"], record)
    return list(by_id.values())


@pytest.mark.parametrize("kill_at", [37, 61])  # 18.5 and 30.5 minutes in: mid-interval, and just after a close
def test_sigkill_mid_interval_then_restart_issues_each_interval_once(
    world: tuple[Path, Path, list[dict[str, Any]]], tmp_path: Path, kill_at: int
) -> None:
    _, site, reference = world
    data, outbox = tmp_path / "data", tmp_path / "outbox.jsonl"
    child = _child(site, data, outbox, 0)
    assert child.stdout is not None
    for line in child.stdout:
        if line.strip() == f"fed {kill_at}":
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=30)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    before_restart = len(_outbox(outbox))
    assert before_restart < len(reference)

    _run_to_end(site, data, outbox, kill_at - 5)  # the driver re-reads a few readings: duplicates are ignored
    delivered = _dedupe_checked(_outbox(outbox))
    assert delivered == reference


def test_sigkill_between_issue_and_outbox_is_redelivered_with_the_same_record(
    world: tuple[Path, Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _, site, reference = world
    data, outbox = tmp_path / "data", tmp_path / "outbox.jsonl"
    child = _child(site, data, outbox, 0, "--die-after-first-issue")
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    # the genesis record got through; the first interval record was issued in the ledger and lost on its way
    assert [r["kind"] for r in _outbox(outbox)] == ["epoch"]

    _run_to_end(site, data, outbox, 30)
    delivered = _dedupe_checked(_outbox(outbox))
    assert delivered == reference

    # what the outbox keeps (it ignores ids it holds) verifies as a whole chain, the re-emitted record in its place
    public = world[0] / "keys" / "incentive-signing.pub.pem"
    kept = tmp_path / "kept.jsonl"
    kept.write_bytes(b"".join(orjson.dumps(record) + b"\n" for record in delivered))
    assert cli_main(["incentives", "verify", str(kept), "--public-key", str(public)]) == 0
