"""The incentive ledger's SQLite file (``<data_dir>/incentives.db``): the source of truth for exactly-once issuing.

Owns the schema and every statement. The stage decides; this module stores and answers. Records, the cursor move,
the meters' anchors and the chain head are written in one transaction (:meth:`Ledger.commit_issue`), so after
``kill -9`` an interval is either issued (and never again) or not (and is issued after restart with the same id).

Where the writes run: every method is a blocking SQLite call on the caller's thread, and the stage calls them on the
event loop today (a commit is milliseconds with ``durability: power`` on an SD card, one per issued interval). The
stage writes through three methods only, each taking plain immutable values and returning nothing the stage has to
wait for beyond an error: :meth:`Ledger.store_readings`, :meth:`Ledger.commit_issue` (one :class:`IssueCommit`) and
:meth:`Ledger.set_meta`. That is the seam for moving them to a writer thread, as the outbox does, without touching
the stage's decisions or the bytes of a record.

Imports SQLite and the pure energy module; never a protocol library, the bus or the outbox.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import StoreError
from gateway.files import create_private_sqlite, ensure_private_dir
from gateway.incentives.energy import Anchor, Reading

LEDGER_FILE = "incentives.db"
#: bumped when the layout changes incompatibly; a ledger of another version is refused with a clear message
LEDGER_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS epochs (epoch INTEGER PRIMARY KEY, programme TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    point TEXT NOT NULL, ts_ns INTEGER NOT NULL, micro_kwh INTEGER NOT NULL,
    PRIMARY KEY (point, ts_ns)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS anchors (
    point TEXT PRIMARY KEY, edge_ns INTEGER NOT NULL, ts_ns INTEGER NOT NULL, micro_kwh INTEGER NOT NULL,
    allocated INTEGER NOT NULL,
    run_since_ns INTEGER            -- when the run of equal readings ending at the anchor began (NULL: at it)
);
CREATE TABLE IF NOT EXISTS cursors (account TEXT PRIMARY KEY, next_start_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS clock_marks (point TEXT NOT NULL, from_ns INTEGER NOT NULL, to_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    account TEXT NOT NULL,          -- the real account id (stays in the building); '' for epoch records
    pseudonym TEXT NOT NULL,
    start_ns INTEGER NOT NULL,      -- interval start; local midnight for settlements; the epoch for epoch records
    local_day TEXT NOT NULL,
    interval_s INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    flagged INTEGER NOT NULL,
    micro_kwh INTEGER NOT NULL,
    delta_micro INTEGER NOT NULL,
    issued_ns INTEGER NOT NULL,
    hash TEXT NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (kind, account, start_ns)
);
CREATE INDEX IF NOT EXISTS records_day ON records (account, local_day);
"""


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record as the ledger row holds it, before it is committed."""

    seq: int
    id: str
    kind: str
    account: str
    pseudonym: str
    start_ns: int
    local_day: str
    interval_s: int
    epoch: int
    flagged: bool
    micro_kwh: int
    delta_micro: int
    hash: str
    body: bytes


@dataclass(frozen=True, slots=True)
class IssueCommit:
    """Everything one issue writes, in one transaction: the records (already sealed: their bytes are final), the
    cursors they move, the anchors their meters' next intervals start from, and for an epoch record the epoch."""

    records: tuple[StoredRecord, ...]
    issued_ns: int
    #: account -> start of its next interval
    cursors: Mapping[str, int]
    #: meter point -> where its next interval starts
    anchors: Mapping[str, Anchor]
    #: (number, programme hash, programme body) of an epoch record
    epoch: tuple[int, str, bytes] | None = None


def version_problem(db: sqlite3.Connection, path: Path) -> str | None:
    """Why a ledger file of another version cannot be used (``Ledger.open`` and ``check`` refuse it), or None."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    has_tables = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'records'").fetchone() is not None
    if has_tables and version != LEDGER_VERSION:
        return (
            f"{path} was written by an older gateway (ledger version {version}, records schema 1): keep it "
            f"for audit (verify its records with the release that wrote them) and start this one in a "
            f"fresh data directory, or move {path.name} aside"
        )
    return None


#: SQLite page cache of the ledger's connection, KiB (see ``Ledger.open``)
CACHE_KIB = 256


class Ledger:
    """One SQLite connection; every method is a short statement or one transaction. Callers serialise access."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    @classmethod
    def open(cls, data_dir: Path, *, durable: bool) -> Ledger:
        """Open or create the ledger (file mode 0600: it holds real account ids); StoreError when it cannot be used."""
        path = Path(data_dir) / LEDGER_FILE
        try:
            ensure_private_dir(path.parent)
            db = create_private_sqlite(path, isolation_level=None, check_same_thread=False)
            problem = version_problem(db, path)
            if problem is not None:
                db.close()
                raise StoreError(problem)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            # a few records a day, read back by interval: 256 KiB of page cache, not SQLite's 2000 KiB, which a
            # ledger of a few years would otherwise fill and keep in RSS (-N: KiB, not pages)
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(anchors)")}
            if "run_since_ns" not in columns:  # a version 2 ledger from before 2026-12-03: NULL means "at the anchor"
                db.execute("ALTER TABLE anchors ADD COLUMN run_since_ns INTEGER")
            db.execute(f"PRAGMA user_version = {LEDGER_VERSION}")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the incentive ledger {path}: {exc}") from exc
        return cls(db)

    def close(self) -> None:
        self._db.close()

    def _run(self, what: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"incentive ledger: cannot {what}: {exc}") from exc

    # -- meta and epochs ----------------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        rows = self._run("read meta", "SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self._run(
            "write meta",
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def latest_epoch(self) -> tuple[int, str, bytes] | None:
        rows = self._run("read epochs", "SELECT epoch, programme, body FROM epochs ORDER BY epoch DESC LIMIT 1")
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None

    def has_records(self) -> bool:
        return bool(self._run("read records", "SELECT 1 FROM records LIMIT 1"))

    # -- state --------------------------------------------------------------------------------------------------

    def cursors(self) -> dict[str, int]:
        return dict(self._run("read cursors", "SELECT account, next_start_ns FROM cursors"))

    def issued_accounts(self) -> set[str]:
        return {
            row[0] for row in self._run("read records", "SELECT DISTINCT account FROM records WHERE kind = 'interval'")
        }

    def anchors(self) -> dict[str, Anchor]:
        rows = self._run(
            "read anchors", "SELECT point, edge_ns, ts_ns, micro_kwh, allocated, run_since_ns FROM anchors"
        )
        return {
            point: Anchor(edge, Reading(ts, micro), allocated, since)
            for point, edge, ts, micro, allocated, since in rows
        }

    def latest_readings(self) -> dict[str, Reading]:
        rows = self._run(
            "read readings", "SELECT point, MAX(ts_ns), micro_kwh FROM readings GROUP BY point"
        )  # SQLite returns the row of the MAX for a bare column
        return {point: Reading(ts, micro) for point, ts, micro in rows}

    def clock_marks(self) -> list[tuple[str, int, int]]:
        return [tuple(row) for row in self._run("read clock marks", "SELECT point, from_ns, to_ns FROM clock_marks")]

    def head(self) -> tuple[int, str, int] | None:
        rows = self._run("read the chain head", "SELECT seq, hash, issued_ns FROM records ORDER BY seq DESC LIMIT 1")
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None

    def bodies_since(self, issued_ns: int) -> list[tuple[bytes, int]]:
        rows = self._run(
            "read records", "SELECT body, issued_ns FROM records WHERE issued_ns >= ? ORDER BY seq", (issued_ns,)
        )
        return [(row[0], row[1]) for row in rows]

    def bodies_between(self, first_ns: int, after_ns: int) -> list[bytes]:
        rows = self._run(
            "read records",
            "SELECT body FROM records WHERE kind != 'epoch' AND start_ns >= ? AND start_ns < ? ORDER BY seq",
            (first_ns, after_ns),
        )
        return [row[0] for row in rows]

    # -- readings -----------------------------------------------------------------------------------------------

    def store_readings(
        self, rows: list[tuple[str, int, int]], cursors: dict[str, int], marks: list[tuple[str, int, int]]
    ) -> int:
        """Store readings, moved cursors and clock marks in one transaction; the number of new readings."""
        try:
            with self._db:
                self._db.execute("BEGIN")
                before = self._db.total_changes
                self._db.executemany("INSERT OR IGNORE INTO readings (point, ts_ns, micro_kwh) VALUES (?, ?, ?)", rows)
                stored = self._db.total_changes - before
                self._db.executemany(
                    "INSERT INTO cursors (account, next_start_ns) VALUES (?, ?) "
                    "ON CONFLICT (account) DO UPDATE SET next_start_ns = excluded.next_start_ns",
                    list(cursors.items()),
                )
                self._db.executemany("INSERT INTO clock_marks (point, from_ns, to_ns) VALUES (?, ?, ?)", marks)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot store meter readings in the incentive ledger: {exc}") from exc
        return stored

    def readings_after(self, point: str, after_ns: int, end_ns: int, extra: int) -> list[Reading]:
        """Readings of ``point`` after ``after_ns`` up to ``end_ns``, and ``extra`` more beyond it."""
        rows = self._run(
            "read readings",
            "SELECT ts_ns, micro_kwh FROM readings WHERE point = ? AND ts_ns > ? AND ts_ns < ? ORDER BY ts_ns",
            (point, after_ns, end_ns),
        )
        rows += self._run(
            "read readings",
            "SELECT ts_ns, micro_kwh FROM readings WHERE point = ? AND ts_ns >= ? ORDER BY ts_ns LIMIT ?",
            (point, max(end_ns, after_ns + 1), extra),
        )
        return [Reading(ts, micro) for ts, micro in rows]

    def last_reading_at_or_before(self, point: str, ts_ns: int) -> Reading | None:
        rows = self._run(
            "read readings",
            "SELECT ts_ns, micro_kwh FROM readings WHERE point = ? AND ts_ns <= ? ORDER BY ts_ns DESC LIMIT 1",
            (point, ts_ns),
        )
        return Reading(rows[0][0], rows[0][1]) if rows else None

    def first_reading_after(self, point: str, ts_ns: int) -> Reading | None:
        rows = self._run(
            "read readings",
            "SELECT ts_ns, micro_kwh FROM readings WHERE point = ? AND ts_ns > ? ORDER BY ts_ns LIMIT 1",
            (point, ts_ns),
        )
        return Reading(rows[0][0], rows[0][1]) if rows else None

    # -- history for baselines ----------------------------------------------------------------------------------

    def history(self, account: str, interval_s: int, starts: Sequence[int]) -> dict[int, int]:
        if not starts:
            return {}
        marks = ",".join("?" * len(starts))
        rows = self._run(  # the f-string adds "?" placeholders only
            "read history",
            "SELECT start_ns, micro_kwh FROM records WHERE kind = 'interval' AND account = ? AND flagged = 0 "  # noqa: S608
            f"AND interval_s = ? AND start_ns IN ({marks})",
            (account, interval_s, *starts),
        )
        return dict(rows)

    def abnormal_days(self, account: str) -> set[str]:
        """Local days on which the account had a flagged interval: never like days."""
        rows = self._run(
            "read history",
            "SELECT DISTINCT local_day FROM records WHERE kind = 'interval' AND account = ? AND flagged = 1",
            (account,),
        )
        return {row[0] for row in rows}

    def day_intervals(self, account: str, pseudonym: str, local_day: str) -> list[tuple[str, int, bytes]]:
        """(id, seq, body) of the account's interval records under ``pseudonym`` that start on ``local_day``."""
        rows = self._run(
            "read records",
            "SELECT id, seq, body FROM records WHERE kind = 'interval' AND account = ? AND pseudonym = ? "
            "AND local_day = ? ORDER BY seq",
            (account, pseudonym, local_day),
        )
        return [(row[0], row[1], row[2]) for row in rows]

    # -- issuing ------------------------------------------------------------------------------------------------

    def commit_issue(self, commit: IssueCommit) -> None:
        """Records, the accounts' cursors, their meters' anchors and (for an epoch record) the epoch, in one
        transaction. Readings before an anchor's reading can never be used again and are deleted in the same
        transaction."""
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._insert_records(commit.records, commit.issued_ns)
                self._db.executemany(
                    "INSERT INTO cursors (account, next_start_ns) VALUES (?, ?) "
                    "ON CONFLICT (account) DO UPDATE SET next_start_ns = excluded.next_start_ns",
                    list(commit.cursors.items()),
                )
                for point, anchor in commit.anchors.items():
                    self._move_anchor(point, anchor)
                if commit.epoch is not None:
                    self._db.execute("INSERT INTO epochs (epoch, programme, body) VALUES (?, ?, ?)", commit.epoch)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write an incentive record to the ledger: {exc}") from exc

    def _insert_records(self, records: Sequence[StoredRecord], issued_ns: int) -> None:
        self._db.executemany(
            "INSERT INTO records (seq, id, kind, account, pseudonym, start_ns, local_day, interval_s, epoch, "
            "flagged, micro_kwh, delta_micro, issued_ns, hash, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.seq,
                    r.id,
                    r.kind,
                    r.account,
                    r.pseudonym,
                    r.start_ns,
                    r.local_day,
                    r.interval_s,
                    r.epoch,
                    int(r.flagged),
                    r.micro_kwh,
                    r.delta_micro,
                    issued_ns,
                    r.hash,
                    r.body,
                )
                for r in records
            ],
        )

    def _move_anchor(self, point: str, anchor: Anchor) -> None:
        """The meter's next interval starts here: what lies before it is never read again."""
        self._db.execute(
            "INSERT INTO anchors (point, edge_ns, ts_ns, micro_kwh, allocated, run_since_ns) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (point) DO UPDATE SET edge_ns = excluded.edge_ns, ts_ns = excluded.ts_ns, "
            "micro_kwh = excluded.micro_kwh, allocated = excluded.allocated, run_since_ns = excluded.run_since_ns",
            (
                point,
                anchor.edge_ns,
                anchor.reading.ts_ns,
                anchor.reading.micro_kwh,
                anchor.allocated,
                anchor.run_since_ns,
            ),
        )
        self._db.execute("DELETE FROM readings WHERE point = ? AND ts_ns < ?", (point, anchor.reading.ts_ns))
        self._db.execute("DELETE FROM clock_marks WHERE point = ? AND to_ns < ?", (point, anchor.edge_ns))
