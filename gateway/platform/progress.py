"""The receiver's durable progress: what it has seen, the verified incentive ledger, and the quarantine.

Owns one SQLite database (WAL, 0600 via ``gateway.files``) that every receiver process of one platform shares, and
the one transaction that moves it (``commit``). Order per batch, in ``Receiver``: the telemetry is written to the
TSDB first, then ``commit`` records it as seen, then the broker gets the acks. A receiver killed before the commit
gets the batch again and writes the same points again (same series, same timestamps: idempotent); one killed after
the commit but before the acks gets it again and finds every key seen (a duplicate, counted, not written). Nothing is
lost and nothing is counted twice.

Tables:
    ``seen``        (gateway, key) -> digest of every telemetry message, event and publication accepted
    ``seqs``        (gateway, seq) telemetry batch numbers seen: gaps are holes between min and max
    ``ledger``      (gateway, seq) the verified incentive records, in chain order
    ``pending``     (gateway, seq) signed records that arrived ahead of their predecessor (another receiver, or a
                    gap): verified and moved to the ledger when the chain reaches them
    ``checkpoints`` gateway -> the newest signed chain-head checkpoint and whether the ledger matches it
    ``quarantine``  every rejected message with its reason, never written to the TSDB or the ledger
    ``counters``    name -> value

Incentive verification is ``gateway.incentives.verify.verify_lines`` over the gateway's ledger plus the new records
(the one implementation of docs/incentives.md), and the signature of each arriving record is checked with
``gateway.incentives.record`` (the same functions the verifier uses) so a forged record never waits in ``pending``.

Imports no broker library and no HTTP client.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.files import create_private_sqlite, ensure_private_dir
from gateway.incentives.record import (
    checkpoint_problems,
    key_id,
    record_hash,
    signature_is_canonical,
    signature_valid,
)
from gateway.incentives.verify import verify_lines
from gateway.platform.messages import Parsed, Rejected

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (gateway TEXT NOT NULL, key TEXT NOT NULL, digest BLOB NOT NULL,
    PRIMARY KEY (gateway, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seqs (gateway TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (gateway, seq))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger (gateway TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL, hash TEXT NOT NULL,
    record BLOB NOT NULL, PRIMARY KEY (gateway, seq));
CREATE UNIQUE INDEX IF NOT EXISTS ledger_id ON ledger (gateway, id);
CREATE TABLE IF NOT EXISTS pending (gateway TEXT NOT NULL, seq INTEGER NOT NULL, hash TEXT NOT NULL,
    record BLOB NOT NULL, PRIMARY KEY (gateway, seq));
CREATE TABLE IF NOT EXISTS checkpoints (gateway TEXT PRIMARY KEY, seq INTEGER NOT NULL, checkpoint BLOB NOT NULL,
    matches INTEGER);
CREATE TABLE IF NOT EXISTS quarantine (id INTEGER PRIMARY KEY AUTOINCREMENT, received_ns INTEGER NOT NULL,
    gateway TEXT NOT NULL, topic TEXT NOT NULL, problem TEXT NOT NULL, reason TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

#: how long a receiver starting beside another waits for it to finish setting up the shared database
SETUP_WAIT_SECONDS = 30.0
#: upper bounds (ms) of the end-to-end latency histogram: a read's time to the commit that recorded it (the
#: gateway's clock against the receiver's: on one machine in tests and the bench; across machines, NTP-bounded)
LATENCY_BUCKETS_MS = (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000)

KeyLookup = Callable[[str], Ed25519PublicKey | None]


@dataclass
class BatchResult:
    """What one committed batch did; ``rejected`` are (gateway, problem class, reason) for the log."""

    counts: Counter[str] = field(default_factory=Counter)
    rejected: list[tuple[str, str, str]] = field(default_factory=list)
    #: gateways that had good input in this batch (their bad-input episode ends)
    good: set[str] = field(default_factory=set)


class Progress:
    """The shared progress database. One connection per receiver process; writers serialise on SQLite's lock."""

    def __init__(self, path: Path, *, keys: KeyLookup) -> None:
        ensure_private_dir(Path(path).parent)
        self.path = Path(path)
        self.keys = keys
        # autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE) so two receivers never interleave
        self.db = create_private_sqlite(self.path, isolation_level=None, timeout=60.0, check_same_thread=False)
        self._set_up()

    def _set_up(self) -> None:
        """WAL mode and the schema. Two receivers started together (they share this file) may find the other one
        switching the journal mode: SQLite answers that with "database is locked" at once, without waiting for its
        busy timeout, so that one case is retried here for a while (a receiver exited instead, found by the
        shared-subscription test under load)."""
        deadline = time.monotonic() + SETUP_WAIT_SECONDS
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.db.close()

    # -- reads without the write lock (a hint; commit decides) ---------------------------------------------------

    def unseen(self, messages: Iterable[Parsed]) -> list[Parsed]:
        """Telemetry messages whose key is not recorded yet: what the TSDB still has to be given."""
        out = []
        for message in messages:
            row = self.db.execute(
                "SELECT 1 FROM seen WHERE gateway=? AND key=?", (message.gateway, message.key)
            ).fetchone()
            if row is None:
                out.append(message)
        return out

    # -- the one write --------------------------------------------------------------------------------------------

    def commit(self, items: list[tuple[Parsed | Rejected, bytes]]) -> BatchResult:
        """Record a batch in one transaction (after its telemetry reached the TSDB); returns what happened."""
        result = BatchResult()
        now = time.time_ns()
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            incentives: dict[str, list[tuple[Parsed, bytes]]] = {}
            for item, payload in items:
                if isinstance(item, Rejected):
                    self._quarantine(result, now, item.gateway, item.topic, item.problem, item.reason, payload)
                    continue
                if item.kind == "ignored":
                    result.counts["ignored"] += 1
                elif item.kind in ("status", "meta"):
                    result.counts[item.kind] += 1
                    result.good.add(item.gateway)
                elif item.kind == "incentive":
                    incentives.setdefault(item.gateway, []).append((item, payload))
                elif item.kind == "checkpoint":
                    self._checkpoint(result, now, item, payload)
                else:
                    self._keyed(result, now, item, payload)
            for gateway, records in incentives.items():
                self._incentives(result, now, gateway, records)
            for name, value in result.counts.items():
                db.execute(
                    "INSERT INTO counters (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                    (name, value),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return result

    def _quarantine(  # noqa: PLR0917 (one call shape, used a dozen times)
        self, result: BatchResult, now: int, gateway: str, topic: str, problem: str, reason: str, payload: bytes
    ) -> None:
        self.db.execute(
            "INSERT INTO quarantine (received_ns, gateway, topic, problem, reason, payload) VALUES (?, ?, ?, ?, ?, ?)",
            (now, gateway, topic, problem, reason, payload),
        )
        result.counts["quarantined"] += 1
        result.counts[f"quarantined.{problem}"] += 1
        result.rejected.append((gateway, problem, reason))

    def _keyed(self, result: BatchResult, now: int, item: Parsed, payload: bytes) -> None:
        """Telemetry, events and publications: new, a duplicate (same key, same content) or a replay (another)."""
        db = self.db
        row = db.execute("SELECT digest FROM seen WHERE gateway=? AND key=?", (item.gateway, item.key)).fetchone()
        if row is not None:
            if bytes(row[0]) == item.digest:
                result.counts[f"duplicate.{item.kind}"] += 1
                return
            self._quarantine(
                result, now, item.gateway, item.topic, "replay",
                f"{item.key}: already received with other content (a resend repeats the same content)", payload,
            )  # fmt: skip
            return
        db.execute("INSERT INTO seen (gateway, key, digest) VALUES (?, ?, ?)", (item.gateway, item.key, item.digest))
        result.good.add(item.gateway)
        result.counts[item.kind] += 1
        if item.kind == "telemetry":
            result.counts["samples"] += item.samples
            # backfill is in the histogram too: read time to commit is what the platform sees, outages included
            if item.historical:
                result.counts["telemetry.historical"] += 1
            late = now // 1_000_000 - item.ts_ms
            bucket = next((b for b in LATENCY_BUCKETS_MS if late <= b), None)
            result.counts[f"latency_ms.le_{bucket}" if bucket is not None else "latency_ms.le_inf"] += 1
            db.execute("INSERT OR IGNORE INTO seqs (gateway, seq) VALUES (?, ?)", (item.gateway, item.seq))

    # -- incentive records and checkpoints ------------------------------------------------------------------------

    def _signature_problem(self, gateway: str, record: dict[str, Any]) -> str | None:
        key = self.keys(gateway)
        if key is None:
            return f"no public key for gateway {gateway}: its records cannot be verified"
        if record["key_id"] != key_id(key):
            return f"signed by key {record['key_id']}, not by {gateway}'s key {key_id(key)}"
        if not signature_valid(record, key) or not signature_is_canonical(record["signature"]):
            return "bad signature: the record was changed after it was signed, or not signed by the gateway"
        return None

    def _incentives(self, result: BatchResult, now: int, gateway: str, records: list[tuple[Parsed, bytes]]) -> None:
        db = self.db
        for item, payload in sorted(records, key=lambda r: r[0].seq or 0):
            record = item.body
            assert record is not None and item.seq is not None
            digest = record_hash(record)
            row = db.execute("SELECT hash FROM ledger WHERE gateway=? AND seq=?", (gateway, item.seq)).fetchone()
            if row is not None:
                if row[0] == digest:
                    result.counts["duplicate.incentive"] += 1
                else:
                    self._quarantine(
                        result, now, gateway, item.topic, "replay",
                        f"incentive seq {item.seq}: the verified ledger holds another record at this seq", payload,
                    )  # fmt: skip
                continue
            problem = self._signature_problem(gateway, record)
            if problem is not None:
                self._quarantine(result, now, gateway, item.topic, "signature", problem, payload)
                continue
            row = db.execute("SELECT hash FROM pending WHERE gateway=? AND seq=?", (gateway, item.seq)).fetchone()
            if row is not None:
                if row[0] == digest:
                    result.counts["duplicate.incentive"] += 1
                else:
                    self._quarantine(
                        result, now, gateway, item.topic, "replay",
                        f"incentive seq {item.seq}: another signed record with this seq is already waiting", payload,
                    )  # fmt: skip
                continue
            db.execute(
                "INSERT INTO pending (gateway, seq, hash, record) VALUES (?, ?, ?, ?)",
                (gateway, item.seq, digest, orjson.dumps(record, option=orjson.OPT_SORT_KEYS)),
            )
        self._drain(result, now, gateway)

    def _drain(self, result: BatchResult, now: int, gateway: str) -> None:
        """Move the pending records that continue the chain into the ledger, each verified against the whole stream
        (verify_lines from genesis: the one implementation of the specification)."""
        db = self.db
        head = db.execute("SELECT coalesce(max(seq), 0) FROM ledger WHERE gateway=?", (gateway,)).fetchone()[0]
        candidates: list[tuple[int, bytes]] = []
        for seq, raw in db.execute(
            "SELECT seq, record FROM pending WHERE gateway=? AND seq>? ORDER BY seq", (gateway, head)
        ):
            if seq != head + len(candidates) + 1:
                break
            candidates.append((seq, bytes(raw)))
        if not candidates:
            return
        stream = [bytes(r[0]) for r in db.execute("SELECT record FROM ledger WHERE gateway=? ORDER BY seq", (gateway,))]
        key = self.keys(gateway)
        assert key is not None  # pending records passed the signature check
        accepted = candidates
        report = verify_lines([*stream, *(raw for _, raw in candidates)], [key])
        if not report.ok:
            # find the first record that makes the stream fail: the records before it are good
            accepted = []
            for seq, raw in candidates:
                report = verify_lines([*stream, *(r for _, r in accepted), raw], [key])
                if not report.ok:
                    db.execute("DELETE FROM pending WHERE gateway=? AND seq=?", (gateway, seq))
                    self._quarantine(
                        result, now, gateway, f"(ledger of {gateway})", "verify",
                        f"incentive seq {seq}: {'; '.join(report.problems[:3])}", raw,
                    )  # fmt: skip
                    break
                accepted.append((seq, raw))
        for seq, raw in accepted:
            record = orjson.loads(raw)
            db.execute(
                "INSERT INTO ledger (gateway, seq, id, hash, record) VALUES (?, ?, ?, ?, ?)",
                (gateway, seq, record["id"], record_hash(record), raw),
            )
            db.execute("DELETE FROM pending WHERE gateway=? AND seq=?", (gateway, seq))
        if accepted:
            result.counts["incentive"] += len(accepted)
            result.good.add(gateway)
            self._recheck_checkpoint(gateway)

    def _checkpoint(self, result: BatchResult, now: int, item: Parsed, payload: bytes) -> None:
        checkpoint = item.body
        assert checkpoint is not None and item.seq is not None
        key = self.keys(item.gateway)
        problems = checkpoint_problems(checkpoint, [key] if key is not None else [])
        if problems:
            self._quarantine(result, now, item.gateway, item.topic, "signature", "; ".join(problems), payload)
            return
        row = self.db.execute("SELECT seq FROM checkpoints WHERE gateway=?", (item.gateway,)).fetchone()
        if row is not None and row[0] >= item.seq:
            result.counts["checkpoint.old"] += 1
            return
        self.db.execute(
            "INSERT INTO checkpoints (gateway, seq, checkpoint, matches) VALUES (?, ?, ?, NULL) "
            "ON CONFLICT (gateway) DO UPDATE SET seq=excluded.seq, checkpoint=excluded.checkpoint, matches=NULL",
            (item.gateway, item.seq, orjson.dumps(checkpoint)),
        )
        result.counts["checkpoint"] += 1
        if not self._recheck_checkpoint(item.gateway):
            self._quarantine(
                result, now, item.gateway, item.topic, "verify",
                "checkpoint: the verified ledger holds another record at its seq", payload,
            )  # fmt: skip

    def _recheck_checkpoint(self, gateway: str) -> bool:
        """Compare the gateway's newest checkpoint with the ledger once the ledger reaches it; False on a mismatch."""
        db = self.db
        row = db.execute("SELECT seq, checkpoint FROM checkpoints WHERE gateway=?", (gateway,)).fetchone()
        if row is None:
            return True
        seq, raw = row
        head = db.execute("SELECT coalesce(max(seq), 0) FROM ledger WHERE gateway=?", (gateway,)).fetchone()[0]
        if head < seq:
            return True  # the tail is still on its way (reported as tail_missing)
        key = self.keys(gateway)
        stream = [bytes(r[0]) for r in db.execute("SELECT record FROM ledger WHERE gateway=? ORDER BY seq", (gateway,))]
        report = verify_lines(stream, [key] if key is not None else [], checkpoint=orjson.loads(raw))
        matches: bool = report.checkpoint_seq == seq
        db.execute("UPDATE checkpoints SET matches=? WHERE gateway=?", (int(matches), gateway))
        return matches

    # -- the report -------------------------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Counters, and per gateway: telemetry seq gaps, incentive head, records waiting, checkpoint state."""
        db = self.db
        counters = dict(db.execute("SELECT name, value FROM counters ORDER BY name").fetchall())
        gateways: dict[str, dict[str, Any]] = {}
        for gateway, low, high, count in db.execute(
            "SELECT gateway, min(seq), max(seq), count(*) FROM seqs GROUP BY gateway"
        ):
            gaps = high - low + 1 - count
            gateways.setdefault(gateway, {})["telemetry"] = {"first_seq": low, "last_seq": high, "gaps": gaps}
        for gateway, head, count in db.execute("SELECT gateway, max(seq), count(*) FROM ledger GROUP BY gateway"):
            gateways.setdefault(gateway, {})["incentive"] = {"head_seq": head, "records": count}
        for gateway, waiting, low in db.execute("SELECT gateway, count(*), min(seq) FROM pending GROUP BY gateway"):
            gateways.setdefault(gateway, {}).setdefault("incentive", {"head_seq": 0, "records": 0})
            gateways[gateway]["incentive"].update(waiting=waiting, waiting_from_seq=low)
        for gateway, seq, matches in db.execute("SELECT gateway, seq, matches FROM checkpoints"):
            entry = gateways.setdefault(gateway, {}).setdefault("incentive", {"head_seq": 0, "records": 0})
            entry["checkpoint_seq"] = seq
            entry["checkpoint_matches"] = None if matches is None else bool(matches)
            entry["tail_missing"] = max(0, seq - entry["head_seq"])
        quarantine = dict(db.execute("SELECT problem, count(*) FROM quarantine GROUP BY problem").fetchall())
        return {
            "counters": counters,
            "quarantine": quarantine,
            "gaps": sum(g.get("telemetry", {}).get("gaps", 0) for g in gateways.values()),
            "gateways": dict(sorted(gateways.items())),
        }

    def latency_percentile(self, share: float) -> int | None:
        """The histogram bucket (upper bound, ms; -1 beyond the last) holding the ``share`` quantile of telemetry
        latency, read time to commit."""
        counters = dict(self.db.execute("SELECT name, value FROM counters WHERE name LIKE 'latency_ms.%'").fetchall())
        buckets = [(b, counters.get(f"latency_ms.le_{b}", 0)) for b in LATENCY_BUCKETS_MS]
        buckets.append((-1, counters.get("latency_ms.le_inf", 0)))
        total = sum(n for _, n in buckets)
        if total == 0:
            return None
        running = 0
        for bound, n in buckets:
            running += n
            if running >= share * total:
                return bound
        return -1

    def quarantined(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT received_ns, gateway, topic, problem, reason FROM quarantine ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [dict(zip(("received_ns", "gateway", "topic", "problem", "reason"), r, strict=True)) for r in rows]
