"""``CommandJournal``: the durable record of every platform command the gateway has seen and how it answered.

Owns ``<data_dir>/commands.db`` (SQLite, WAL, ``synchronous=FULL``, file 0600): one row per command id (payload
hash, received time, the result event once there is one, whether that result was handed to the outbox) and one row
per signed-command nonce. Entries are kept ``retention`` (7 days) after receipt; the platform uplink's config
refuses a command max age that is not far shorter, so an id or nonce cannot be forgotten while a command carrying
it could still be accepted.

Crash rule (the order ``gateway.platform_commands`` follows):

1. ``receive`` is committed (fsync) *before* the device is written;
2. ``settle`` stores the result event *after* the write, before it goes to the outbox;
3. ``mark_answered`` after the outbox has taken it.

A restart that finds a row without a result (the gateway died between 1 and 2) does not know whether the device
took the write: it never re-applies the command and answers ``unknown``. A row with a result not yet answered
(died between 2 and 3) has that same result handed to the outbox again. Nothing is ever applied twice; at worst
the platform learns "unknown outcome".

Imports only the standard library, ``gateway.files`` and ``gateway.errors``; never the outbox or MQTT.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.errors import StoreError
from gateway.files import create_private_sqlite, ensure_private_dir

JOURNAL_FILE = "commands.db"
#: SQLite page cache of the journal connection, KiB: it writes a few rows a day
CACHE_KIB = 256
#: seven days: far beyond any command's max age, so a pruned id could only come back refused as stale
DEFAULT_RETENTION_S = 7 * 86_400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    payload_hash TEXT NOT NULL,
    received_ns INTEGER NOT NULL,
    result TEXT,
    answered INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS commands_received ON commands (received_ns);
CREATE TABLE IF NOT EXISTS nonces (
    nonce TEXT PRIMARY KEY,
    received_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS nonces_received ON nonces (received_ns);
"""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    command_id: str
    payload_hash: str
    received_ns: int
    #: the stored result event (``{"id", "subject", "ts", "body"}``), None while the command is being applied
    result: dict[str, Any] | None
    answered: bool


class CommandJournal:
    """One SQLite connection; every method commits before it returns (thread-safe, for ``asyncio.to_thread``)."""

    def __init__(self, path: Path, *, retention: float = DEFAULT_RETENTION_S) -> None:
        self.path = Path(path)
        self.retention_ns = int(retention * 1e9)
        self._lock = threading.Lock()
        try:
            ensure_private_dir(self.path.parent)
            db = create_private_sqlite(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a command's journal entry must survive a power cut
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")  # not SQLite's 2 MiB default: see CACHE_KIB
            db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open command journal {self.path}: {exc}") from exc
        self._db = db

    def get(self, command_id: str) -> JournalEntry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, payload_hash, received_ns, result, answered FROM commands WHERE id = ?", (command_id,)
            ).fetchone()
        return _entry(row) if row is not None else None

    def receive(
        self,
        command_id: str,
        payload_hash: str,
        received_ns: int,
        nonce: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        """Record a command (and its nonce) as received, durably, before anything is applied; a command answered
        without touching a device comes with its ``result``, in the same transaction."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO commands (id, payload_hash, received_ns, result) VALUES (?, ?, ?, ?)",
                (command_id, payload_hash, received_ns, orjson.dumps(result).decode() if result is not None else None),
            )
            if nonce is not None:
                self._db.execute("INSERT INTO nonces (nonce, received_ns) VALUES (?, ?)", (nonce, received_ns))

    def settle(self, command_id: str, result: dict[str, Any]) -> None:
        """Store the result event of a received command (once; a second settle is ignored)."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "UPDATE commands SET result = ? WHERE id = ? AND result IS NULL",
                (orjson.dumps(result).decode(), command_id),
            )

    def mark_answered(self, command_id: str) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE commands SET answered = 1 WHERE id = ?", (command_id,))

    def nonce_seen(self, nonce: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM nonces WHERE nonce = ?", (nonce,)).fetchone() is not None

    def unanswered(self) -> list[JournalEntry]:
        """Commands whose result never reached the outbox (a crash), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, payload_hash, received_ns, result, answered FROM commands WHERE answered = 0 "
                "ORDER BY received_ns"
            ).fetchall()
        return [_entry(row) for row in rows]

    def prune(self, now_ns: int) -> int:
        """Forget answered commands and nonces received more than ``retention`` ago; returns how many rows went."""
        cutoff = now_ns - self.retention_ns
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            gone = self._db.execute("DELETE FROM commands WHERE received_ns < ? AND answered = 1", (cutoff,)).rowcount
            gone += self._db.execute("DELETE FROM nonces WHERE received_ns < ?", (cutoff,)).rowcount
        return int(gone)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _entry(row: tuple[Any, ...]) -> JournalEntry:
    command_id, payload_hash, received_ns, result, answered = row
    return JournalEntry(
        command_id, payload_hash, int(received_ns), orjson.loads(result) if result is not None else None, bool(answered)
    )
