"""The receiver's judgement of messages and its progress database, without a broker: parse, commit, report."""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.platform.messages import Parsed, Rejected, parse
from gateway.platform.progress import Progress
from gateway.platform.receiver import PublicKeys
from tests.platform_services import IncentiveChain, write_public_key

PREFIX = "city"
BASE = "city/tower/gw1"


@pytest.fixture
def chain(tmp_path: Path) -> IncentiveChain:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    write_public_key(tmp_path / "keys", "tower", "gw1", key)
    return IncentiveChain(site="tower", gateway="gw1", key=key)


@pytest.fixture
def progress(tmp_path: Path, chain: IncentiveChain) -> Any:
    store = Progress(tmp_path / "data" / "progress.db", keys=PublicKeys(tmp_path / "keys"))
    yield store
    store.close()


def message(topic: str, doc: Any) -> tuple[Parsed | Rejected, bytes]:
    payload = orjson.dumps(doc)
    return parse(topic, payload, prefix=PREFIX), payload


def telemetry(seq: int, ts: int, **values: float) -> tuple[Parsed | Rejected, bytes]:
    return message(f"{BASE}/telemetry/m1", {"v": 1, "seq": seq, "ts": ts, "values": values or {"power_kw": 1.5}})


def incentive(record: dict[str, Any]) -> tuple[Parsed | Rejected, bytes]:
    doc = {"v": 1, "id": record["id"], "type": "incentive", "subject": record["id"], "ts": 1, "body": record}
    return message(f"{BASE}/events/incentive", doc)


def checkpoint(body: dict[str, Any]) -> tuple[Parsed | Rejected, bytes]:
    doc = {"v": 1, "id": "cp", "type": "incentive_checkpoint", "subject": "chain", "ts": 1, "body": body}
    return message(f"{BASE}/events/incentive_checkpoint", doc)


def test_telemetry_v1_and_v2_become_line_protocol_with_millisecond_times() -> None:
    parsed, _ = telemetry(7, 1795300001000, power_kw=3.42, energy_kwh=18234)
    assert isinstance(parsed, Parsed)
    assert parsed.key == "t1/m1/7/1795300001000"
    assert parsed.lines == ["platform,device=m1,gateway=gw1,site=tower energy_kwh=18234.0,power_kw=3.42 1795300001000"]
    v2, _ = message(
        f"{BASE}/telemetry/m1",
        {"v": 2, "seq": 8, "reads": [{"ts": 10, "values": {"a": 1.0}}, {"ts": 12, "values": {"b": True}}]},
    )
    assert isinstance(v2, Parsed)
    assert (v2.key, v2.samples) == ("t2/m1/8", 2)
    assert v2.lines[1] == "platform,device=m1,gateway=gw1,site=tower b=true 12"


def test_a_resend_flagged_historical_is_a_duplicate_not_a_replay(progress: Progress) -> None:
    """A broker node dies with a message in flight, unacknowledged: the gateway resends it from its backlog, flagged
    historical. Same key, same readings: the receiver must count it as a duplicate (found by the fleet test)."""
    for version, doc in (
        (1, {"v": 1, "seq": 5, "ts": 5000, "values": {"power_kw": 2.0}}),
        (2, {"v": 2, "seq": 6, "reads": [{"ts": 6000, "values": {"power_kw": 2.0}}]}),
    ):
        live = progress.commit([message(f"{BASE}/telemetry/m1", doc)])
        assert live.counts["telemetry"] == 1, version
        resent = progress.commit([message(f"{BASE}/telemetry/m1", {**doc, "historical": True})])
        assert resent.counts["duplicate.telemetry"] == 1 and not resent.rejected, version
        # the flag never hides other content
        changed = copy.deepcopy(doc)
        (changed if version == 1 else changed["reads"][0])["values"]["power_kw"] = 3.0  # type: ignore[index]
        forged = progress.commit([message(f"{BASE}/telemetry/m1", {**changed, "historical": True})])
        assert [r[1] for r in forged.rejected] == ["replay"], version


@pytest.mark.parametrize(
    ("topic", "payload", "problem"),
    [
        (f"{BASE}/telemetry/m1", b'{"v": 1, "seq": "x", "ts": 1, "values": {}}', "schema"),
        (f"{BASE}/telemetry/m1", b'{"v": 3, "seq": 1, "ts": 1, "values": {}}', "schema"),
        (f"{BASE}/telemetry/m1", b"not json", "json"),
        (f"{BASE}/events/alarm", b'{"v": 1, "id": "a", "type": "notice", "subject": "s", "ts": 1}', "schema"),
        ("elsewhere/tower/gw1/status", b"{}", "topic"),
        (f"{BASE}/telemetry", b"{}", "topic"),
    ],
)
def test_bad_input_is_rejected_with_its_class(topic: str, payload: bytes, problem: str) -> None:
    parsed = parse(topic, payload, prefix=PREFIX)
    assert isinstance(parsed, Rejected)
    assert parsed.problem == problem


def test_duplicates_are_counted_and_replays_with_other_content_quarantined(progress: Progress) -> None:
    first = progress.commit([telemetry(1, 1000), telemetry(2, 2000)])
    assert first.counts["telemetry"] == 2
    again = progress.commit([telemetry(1, 1000)])
    assert again.counts["duplicate.telemetry"] == 1 and again.counts["telemetry"] == 0
    forged = progress.commit([telemetry(2, 2000, power_kw=99.0)])
    assert forged.rejected and forged.rejected[0][1] == "replay"
    report = progress.report()
    assert report["counters"]["telemetry"] == 2
    assert report["quarantine"] == {"replay": 1}
    # the unseen filter (what goes to the TSDB) knows the first two only
    (new,) = progress.unseen([p for p, _ in (telemetry(2, 2000), telemetry(3, 3000))])  # type: ignore[misc]
    assert new.key == "t1/m1/3/3000"


def test_seq_gaps_per_gateway_close_when_the_missing_batch_arrives(progress: Progress) -> None:
    progress.commit([telemetry(1, 1000), telemetry(2, 2000), telemetry(5, 5000)])
    assert progress.report()["gateways"]["tower/gw1"]["telemetry"]["gaps"] == 2
    progress.commit([telemetry(3, 3000), telemetry(4, 4000)])
    assert progress.report()["gaps"] == 0


def test_incentive_records_in_any_order_reach_the_ledger_once_verified(
    progress: Progress, chain: IncentiveChain
) -> None:
    records = [chain.next() for _ in range(4)]
    result = progress.commit([incentive(records[2]), incentive(records[0])])  # 3 waits for 2
    assert result.counts["incentive"] == 1
    entry = progress.report()["gateways"]["tower/gw1"]["incentive"]
    assert entry == entry | {"head_seq": 1, "waiting": 1, "waiting_from_seq": 3}
    result = progress.commit([incentive(records[1]), incentive(records[3]), incentive(records[0])])
    assert result.counts["incentive"] == 3 and result.counts["duplicate.incentive"] == 1
    assert progress.report()["gateways"]["tower/gw1"]["incentive"] == {"head_seq": 4, "records": 4}
    stored = [orjson.loads(r[0]) for r in progress.db.execute("SELECT record FROM ledger ORDER BY seq")]
    assert stored == records


def test_forged_and_replayed_incentive_records_are_quarantined_never_in_the_ledger(
    progress: Progress, chain: IncentiveChain
) -> None:
    genesis, second = chain.next(), chain.next()
    forged = copy.deepcopy(second)
    forged["reason"] = "money for nothing"  # changed after signing
    other_key = Ed25519PrivateKey.generate()
    result = progress.commit([incentive(genesis), incentive(forged)])
    assert [r[1] for r in result.rejected] == ["signature"]
    progress.commit([incentive(second)])
    # a different, validly shaped record at a seq the ledger holds (signed by someone else): a replay/forgery
    impostor = copy.deepcopy(second)
    impostor["reason"] = "again"
    from gateway.incentives.record import sign

    impostor["signature"] = sign(impostor, other_key)
    result = progress.commit([incentive(impostor)])
    assert [r[1] for r in result.rejected] == ["replay"]
    ledger = [orjson.loads(r[0]) for r in progress.db.execute("SELECT record FROM ledger ORDER BY seq")]
    assert ledger == [genesis, second]
    reasons = {r["problem"]: r["reason"] for r in progress.quarantined()}
    assert "bad signature" in reasons["signature"] and "another record" in reasons["replay"]


def test_a_signed_record_the_verifier_refuses_is_quarantined_and_the_chain_waits(
    progress: Progress, chain: IncentiveChain
) -> None:
    genesis = chain.next()
    broken = chain.next()
    broken["prev_hash"] = "f" * 64  # signed by the gateway's key, but not linked to the chain
    from gateway.incentives.record import sign

    broken["signature"] = sign({k: v for k, v in broken.items() if k != "signature"}, chain.key)
    result = progress.commit([incentive(genesis), incentive(broken)])
    assert result.counts["incentive"] == 1
    assert [r[1] for r in result.rejected] == ["verify"]
    assert "hash chain broken" in result.rejected[0][2]
    assert progress.report()["gateways"]["tower/gw1"]["incentive"]["head_seq"] == 1


def test_checkpoints_are_verified_against_the_ledger_and_forged_ones_quarantined(
    progress: Progress, chain: IncentiveChain
) -> None:
    records = [chain.next() for _ in range(3)]
    head = chain.checkpoint()
    progress.commit([incentive(records[0]), checkpoint(head)])
    entry = progress.report()["gateways"]["tower/gw1"]["incentive"]
    assert entry["tail_missing"] == 2 and entry["checkpoint_matches"] is None
    progress.commit([incentive(records[1]), incentive(records[2])])
    entry = progress.report()["gateways"]["tower/gw1"]["incentive"]
    assert entry["tail_missing"] == 0 and entry["checkpoint_matches"] is True
    forged = dict(head, seq=2)
    result = progress.commit([checkpoint(forged)])
    assert [r[1] for r in result.rejected] == ["signature"]


def test_unknown_gateway_key_quarantines_its_records(progress: Progress) -> None:
    stranger = IncentiveChain(site="tower", gateway="gw9", key=Ed25519PrivateKey.generate())
    record = stranger.next()
    doc = {"v": 1, "id": record["id"], "type": "incentive", "subject": record["id"], "ts": 1, "body": record}
    result = progress.commit([message("city/tower/gw9/events/incentive", doc)])
    assert result.rejected[0][1] == "signature" and "no public key" in result.rejected[0][2]


def test_a_record_on_another_gateways_topic_is_rejected(chain: IncentiveChain) -> None:
    record = chain.next()
    doc = {"v": 1, "id": record["id"], "type": "incentive", "subject": record["id"], "ts": 1, "body": record}
    parsed = parse("city/tower/gw2/events/incentive", orjson.dumps(doc), prefix=PREFIX)
    assert isinstance(parsed, Rejected) and parsed.problem == "identity"


def test_the_progress_database_is_private(tmp_path: Path, progress: Progress) -> None:
    progress.commit([telemetry(1, 1000)])
    for name in os.listdir(tmp_path / "data"):
        assert stat.S_IMODE((tmp_path / "data" / name).stat().st_mode) == 0o600, name


def test_bad_input_is_logged_once_per_gateway_and_episode(progress: Progress, caplog: pytest.LogCaptureFixture) -> None:
    from gateway.platform.receiver import _Episodes

    episodes = _Episodes({})
    bad = message(f"{BASE}/telemetry/m1", {"v": 1, "seq": "x"})
    with caplog.at_level("INFO", logger="gateway.platform"):
        for _ in range(3):
            episodes.note(progress.commit([bad]))
        episodes.note(progress.commit([telemetry(1, 1000)]))  # good input ends the episode
        episodes.note(progress.commit([bad]))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("tower/gw1" in w for w in warnings)
    assert any("good input again after 3 quarantined" in r.getMessage() for r in caplog.records)
    assert progress.report()["quarantine"] == {"schema": 4}


def test_a_receiver_starting_while_another_holds_the_database_waits_for_it(tmp_path: Path) -> None:
    """Two receivers share one progress database and may start together: the second must wait, not exit. (This
    covers the wait on a held lock; the retry of an immediate "database is locked" from the journal-mode switch,
    seen once under load in the shared-subscription test, could not be provoked on demand.)"""
    import sqlite3
    import threading
    import time

    path = tmp_path / "data" / "progress.db"
    path.parent.mkdir()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE held (x)")
    other.execute("BEGIN EXCLUSIVE")  # what the first receiver holds while it switches to WAL and creates tables
    threading.Timer(0.5, lambda: (other.execute("COMMIT"), other.close())).start()
    started = time.monotonic()
    store = Progress(path, keys=PublicKeys(tmp_path / "keys"))
    try:
        assert time.monotonic() - started >= 0.4  # it waited for the lock
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.report()["counters"] == {}
    finally:
        store.close()
