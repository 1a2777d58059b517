"""Durable rule state: pending ``for:`` timers, active latches, cooldowns and periodic deadlines, and the values rules
gave virtual points with ``set:`` (a latch that set ``building.load_shed: true`` must not resume beside a ``false``).

Owns ``RuleStateStore``, a small SQLite file of its own (``<data_dir>/rules-state.db``), separate from the outbox so
a rule-state write never waits behind a telemetry batch. Rows change only when a rule changes state (a few times an
hour per rule), so each save is one short transaction. Imports nothing from the runtime.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.errors import StoreError
from gateway.files import create_private_sqlite, ensure_private_dir

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rule_state (
    rule_id       TEXT PRIMARY KEY,
    fingerprint   TEXT NOT NULL,
    state         TEXT NOT NULL,
    since_ns      INTEGER NOT NULL,
    pending_ns    INTEGER,
    activated_ns  INTEGER,
    last_fired_ns INTEGER,
    next_due_ns   INTEGER
)
"""
_VALUES_SCHEMA = """
CREATE TABLE IF NOT EXISTS virtual_value (
    point TEXT PRIMARY KEY,
    value TEXT NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class SavedRuleState:
    """What a rule needs to resume after a restart. ``fingerprint`` identifies the rule's condition: a row whose
    fingerprint no longer matches (the engineer changed ``when:``) is ignored rather than trusted."""

    rule_id: str
    fingerprint: str
    state: str
    since_ns: int
    pending_ns: int | None
    activated_ns: int | None
    last_fired_ns: int | None
    next_due_ns: int | None


#: SQLite page cache of the rule state connection, KiB (see ``RuleStateStore``)
CACHE_KIB = 256


class RuleStateStore:
    """``RuleStateStore(path)``: load, save and prune rule state rows. Raises ``StoreError`` on I/O failure."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            ensure_private_dir(path.parent)
            self._db = create_private_sqlite(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # one row per rule and per saved window: 256 KiB of page cache holds it all for hundreds of rules, and
            # bounds what SQLite's default (2000 KiB) would keep in RSS for a large rule set (-N: KiB, not pages)
            self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self._db.execute(_SCHEMA)
            self._db.execute(_VALUES_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open rule state {path}: {exc}") from exc

    def load(self) -> dict[str, SavedRuleState]:
        try:
            rows = self._db.execute(
                "SELECT rule_id, fingerprint, state, since_ns, pending_ns, activated_ns, last_fired_ns, next_due_ns"
                " FROM rule_state"
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read rule state {self.path}: {exc}") from exc
        return {row[0]: SavedRuleState(*row) for row in rows}

    def save(self, states: Iterable[SavedRuleState]) -> None:
        rows = [
            (
                r.rule_id,
                r.fingerprint,
                r.state,
                r.since_ns,
                r.pending_ns,
                r.activated_ns,
                r.last_fired_ns,
                r.next_due_ns,
            )
            for r in states
        ]
        if not rows:
            return
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO rule_state VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write rule state {self.path}: {exc}") from exc

    def load_values(self) -> dict[str, Any]:
        """Virtual point -> the value a rule last set (JSON: bool, number or string)."""
        try:
            rows = self._db.execute("SELECT point, value FROM virtual_value").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read rule state {self.path}: {exc}") from exc
        return {point: orjson.loads(value) for point, value in rows}

    def save_values(self, values: Iterable[tuple[str, Any]]) -> None:
        rows = [(point, orjson.dumps(value).decode()) for point, value in values]
        if not rows:
            return
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO virtual_value VALUES (?, ?)", rows)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write rule state {self.path}: {exc}") from exc

    def keep_values(self, points: Iterable[str]) -> None:
        """Delete saved values of points that are no longer virtual points."""
        keep = set(points)
        try:
            stale = [(p,) for (p,) in self._db.execute("SELECT point FROM virtual_value") if p not in keep]
            if stale:
                with self._db:
                    self._db.execute("BEGIN")
                    self._db.executemany("DELETE FROM virtual_value WHERE point = ?", stale)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write rule state {self.path}: {exc}") from exc

    def keep_only(self, rule_ids: Iterable[str]) -> None:
        """Delete rows of rules that no longer exist."""
        keep = set(rule_ids)
        try:
            stale = [(r,) for (r,) in self._db.execute("SELECT rule_id FROM rule_state") if r not in keep]
            if stale:
                with self._db:
                    self._db.execute("BEGIN")
                    self._db.executemany("DELETE FROM rule_state WHERE rule_id = ?", stale)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write rule state {self.path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()
