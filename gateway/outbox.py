"""The durable outbox: every sample and event the gateway keeps, until every uplink has delivered it.

Owns the SQLite (WAL) store, its single writer thread and the per-uplink cursors. Imports no protocol library.

Shape of the store
    ``telemetry``: one row per appended batch (a poll or a message burst): ``seq``, sample count, byte size and an
    orjson blob of ``[point, value, ts, quality]`` rows. Storing batches, not samples, makes an append one row and
    lets a replay read thousands of points with one query.
    ``events``: one row per event, unique by event id, so re-issuing an event after a crash is a no-op.
    ``cursors``: per uplink and class, the last ``seq`` the far side accepted.

Writes go through one thread (``outbox-writer``) that commits everything queued in one transaction: callers await
their batch's commit, so an ``await append(...)`` that returned is on disk (and survives ``kill -9``; with
``durability="power"`` it also survives a power cut, at the cost of an fsync per commit).

Budgets: telemetry over its byte budget drops the oldest batches first and counts them; events are never dropped:
over budget, ``event_store_full`` is raised as an alarm flag and ``append_events`` keeps writing (an incentive record
must not be lost because the link was down for a week).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from gateway.errors import StoreError
from gateway.model import Event, Quality, Sample

log = logging.getLogger(__name__)

Kind = Literal["telemetry", "events"]
_QUALITIES = tuple(Quality)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS telemetry (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    created_ns INTEGER NOT NULL,
    n INTEGER NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (name, kind)
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


def encode_samples(samples: Sequence[Sample]) -> bytes:
    return orjson.dumps([tuple(s) for s in samples])


def decode_samples(payload: bytes) -> list[Sample]:
    return [Sample(p, v, t, _QUALITIES[q]) for p, v, t, q in orjson.loads(payload)]


def encode_event(event: Event) -> bytes:
    return orjson.dumps(
        {"id": event.id, "type": event.type, "subject": event.subject, "ts": event.ts, "body": event.body}
    )


def decode_event(payload: bytes) -> Event:
    raw = orjson.loads(payload)
    return Event(raw["id"], raw["type"], raw["subject"], raw["ts"], raw["body"])


@dataclass(frozen=True, slots=True)
class TelemetryBatch:
    seq: int
    created_ns: int
    samples: list[Sample]


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    created_ns: int
    event: Event


@dataclass(slots=True)
class OutboxStats:
    telemetry_batches: int = 0
    telemetry_samples: int = 0
    telemetry_bytes: int = 0
    event_count: int = 0
    event_bytes: int = 0
    dropped_samples: int = 0
    dropped_batches: int = 0
    appended_samples: int = 0
    appended_events: int = 0
    event_store_full: bool = False
    oldest_telemetry_ns: int | None = None
    last_error: str | None = None
    cursors: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(slots=True)
class _Job:
    kind: str  # "samples" | "events" | "ack" | "register" | "compact" | "sync"
    payload: Any
    future: asyncio.Future[Any] | None
    loop: asyncio.AbstractEventLoop | None


_STOP = object()


class Outbox:
    """Durable store with one writer thread. Create with ``Outbox(path, ...)``; ``await close()`` when done."""

    def __init__(
        self,
        path: Path,
        *,
        durability: Literal["process", "power"] = "process",
        telemetry_budget: int = 256 * 1024**2,
        event_budget: int = 64 * 1024**2,
    ) -> None:
        if telemetry_budget <= 0 or event_budget <= 0:
            raise ValueError("outbox budgets must be positive")
        self.path = Path(path)
        self.durability = durability
        self.telemetry_budget = telemetry_budget
        self.event_budget = event_budget
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._connect()
            self._db.executescript(_SCHEMA)
            self._reader = self._connect()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open outbox {self.path}: {exc}") from exc
        self.stats = OutboxStats()
        self._load_stats()
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._writer_loop, name="outbox-writer", daemon=True)
        self._thread.start()

    # -- connection ---------------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed transaction survives a process crash; FULL adds an fsync per commit so it
        # also survives a power cut.
        db.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'power' else 'NORMAL'}")
        return db

    def _load_stats(self) -> None:
        db = self._db
        row = db.execute("SELECT count(*), coalesce(sum(n), 0), coalesce(sum(size), 0), min(created_ns) FROM telemetry")
        self.stats.telemetry_batches, self.stats.telemetry_samples, self.stats.telemetry_bytes, oldest = row.fetchone()
        self.stats.oldest_telemetry_ns = oldest
        self.stats.event_count, self.stats.event_bytes = db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM events"
        ).fetchone()
        counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
        self.stats.dropped_samples = counters.get("dropped_samples", 0)
        self.stats.dropped_batches = counters.get("dropped_batches", 0)
        for name, kind, seq in db.execute("SELECT name, kind, seq FROM cursors"):
            self.stats.cursors.setdefault(name, {})[kind] = seq
        self.stats.event_store_full = self.stats.event_bytes > self.event_budget

    # -- writer thread ------------------------------------------------------------------------------------------

    def _submit(self, kind: str, payload: Any) -> asyncio.Future[Any]:
        if self._closed:
            raise StoreError("outbox is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put(_Job(kind, payload, future, loop))
        return future

    def _writer_loop(self) -> None:
        while True:
            first = self._jobs.get()
            if first is _STOP:
                return
            jobs = [first]
            stop = False
            # Group everything already queued into one transaction: one commit (and one fsync) for many appends.
            while len(jobs) < 512:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                jobs.append(nxt)
            self._run_jobs(jobs)
            if stop:
                return

    def _run_jobs(self, jobs: list[_Job]) -> None:
        results: list[Any] = []
        try:
            self._db.execute("BEGIN IMMEDIATE")
            results.extend(self._apply(job) for job in jobs)
            self._db.execute("COMMIT")
            self.stats.last_error = None
        except (sqlite3.Error, OSError) as exc:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._load_stats()  # in-memory counters must match what is really on disk
            message = f"outbox write failed: {exc}"
            if self.stats.last_error != message:
                log.error("%s", message)
            self.stats.last_error = message
            for job in jobs:
                self._resolve(job, StoreError(message))
            return
        for job, result in zip(jobs, results, strict=True):
            self._resolve(job, result)

    @staticmethod
    def _resolve(job: _Job, result: Any) -> None:
        future, loop = job.future, job.loop
        if future is None or loop is None:
            return

        def finish() -> None:
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        try:
            loop.call_soon_threadsafe(finish)
        except RuntimeError:
            pass  # the loop is gone (shutdown): nobody is waiting any more

    def _apply(self, job: _Job) -> Any:
        db = self._db
        now = time.time_ns()
        if job.kind == "samples":
            blob, count = job.payload
            db.execute(
                "INSERT INTO telemetry (created_ns, n, size, payload) VALUES (?, ?, ?, ?)",
                (now, count, len(blob), blob),
            )
            self.stats.telemetry_batches += 1
            self.stats.telemetry_samples += count
            self.stats.telemetry_bytes += len(blob)
            self.stats.appended_samples += count
            if self.stats.oldest_telemetry_ns is None:
                self.stats.oldest_telemetry_ns = now
            if self.stats.telemetry_bytes > self.telemetry_budget:
                self._drop_oldest_telemetry()
            return None
        if job.kind == "events":
            added = 0
            for event_id, event_type, blob in job.payload:
                cur = db.execute(
                    "INSERT OR IGNORE INTO events (id, type, created_ns, size, payload) VALUES (?, ?, ?, ?, ?)",
                    (event_id, event_type, now, len(blob), blob),
                )
                if cur.rowcount:
                    added += 1
                    self.stats.event_count += 1
                    self.stats.event_bytes += len(blob)
            self.stats.appended_events += added
            full = self.stats.event_bytes > self.event_budget
            if full and not self.stats.event_store_full:
                log.error(
                    "event store over its budget (%d bytes): events are kept, link down too long?", self.event_budget
                )
            self.stats.event_store_full = full
            return added
        if job.kind in ("ack", "register"):
            name, kind, seq = job.payload
            if job.kind == "register":
                db.execute("INSERT OR IGNORE INTO cursors (name, kind, seq) VALUES (?, ?, ?)", (name, kind, seq))
                seq = db.execute("SELECT seq FROM cursors WHERE name=? AND kind=?", (name, kind)).fetchone()[0]
            else:
                db.execute(
                    "INSERT INTO cursors (name, kind, seq) VALUES (?, ?, ?) "
                    "ON CONFLICT (name, kind) DO UPDATE SET seq = max(seq, excluded.seq)",
                    (name, kind, seq),
                )
            current = self.stats.cursors.setdefault(name, {})
            current[kind] = max(current.get(kind, 0), seq)
            return current[kind]
        if job.kind == "compact":
            return self._compact()
        if job.kind == "sync":
            return None
        raise AssertionError(f"unknown outbox job {job.kind}")

    def _drop_oldest_telemetry(self) -> None:
        """Delete oldest batches until under budget (keep at least the newest one)."""
        db = self._db
        excess = self.stats.telemetry_bytes - self.telemetry_budget
        dropped_batches = dropped_samples = freed = 0
        rows = db.execute("SELECT seq, n, size FROM telemetry ORDER BY seq LIMIT -1 OFFSET 0").fetchall()
        last_seq = 0
        for seq, n, size in rows[:-1]:
            if freed >= excess:
                break
            freed += size
            dropped_batches += 1
            dropped_samples += n
            last_seq = seq
        if not dropped_batches:
            return
        db.execute("DELETE FROM telemetry WHERE seq <= ?", (last_seq,))
        self.stats.telemetry_batches -= dropped_batches
        self.stats.telemetry_samples -= dropped_samples
        self.stats.telemetry_bytes -= freed
        self.stats.dropped_batches += dropped_batches
        self.stats.dropped_samples += dropped_samples
        for name, value in (
            ("dropped_samples", self.stats.dropped_samples),
            ("dropped_batches", self.stats.dropped_batches),
        ):
            db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)", (name, value))
        oldest = db.execute("SELECT min(created_ns) FROM telemetry").fetchone()[0]
        self.stats.oldest_telemetry_ns = oldest
        log.warning(
            "telemetry store over budget: dropped %d oldest samples (%d total since install)",
            dropped_samples,
            self.stats.dropped_samples,
        )

    def _compact(self) -> dict[str, int]:
        """Delete what every registered uplink has acked. With no uplink registered, nothing is deleted."""
        db = self._db
        removed = {}
        for kind, table in (("telemetry", "telemetry"), ("events", "events")):
            row = db.execute("SELECT min(seq), count(*) FROM cursors WHERE kind=?", (kind,)).fetchone()
            low, count = row
            if not count:
                removed[kind] = 0
                continue
            if table == "telemetry":
                n, size = db.execute(
                    "SELECT coalesce(sum(n), 0), coalesce(sum(size), 0) FROM telemetry WHERE seq <= ?", (low,)
                ).fetchone()
                cur = db.execute("DELETE FROM telemetry WHERE seq <= ?", (low,))
                self.stats.telemetry_batches -= cur.rowcount
                self.stats.telemetry_samples -= n
                self.stats.telemetry_bytes -= size
                self.stats.oldest_telemetry_ns = db.execute("SELECT min(created_ns) FROM telemetry").fetchone()[0]
            else:
                size = db.execute("SELECT coalesce(sum(size), 0) FROM events WHERE seq <= ?", (low,)).fetchone()[0]
                cur = db.execute("DELETE FROM events WHERE seq <= ?", (low,))
                self.stats.event_count -= cur.rowcount
                self.stats.event_bytes -= size
                self.stats.event_store_full = self.stats.event_bytes > self.event_budget
            removed[kind] = cur.rowcount
        return removed

    # -- public API ---------------------------------------------------------------------------------------------

    async def append(self, samples: Sequence[Sample]) -> None:
        """Store one batch of telemetry; returns once it is committed."""
        if not samples:
            return
        await self._submit("samples", (encode_samples(samples), len(samples)))

    async def append_events(self, events: Sequence[Event]) -> int:
        """Store events (idempotent by id); returns how many were new."""
        if not events:
            return 0
        rows = [(e.id, e.type, encode_event(e)) for e in events]
        result: int = await self._submit("events", rows)
        return result

    async def register_cursor(self, name: str, kind: Kind, *, start: Literal["beginning", "end"] = "beginning") -> int:
        """Create the cursor of a new uplink (idempotent); returns its position."""
        seq = 0
        if start == "end":
            table = "telemetry" if kind == "telemetry" else "events"
            seq = self._reader.execute(f"SELECT coalesce(max(seq), 0) FROM {table}").fetchone()[0]  # noqa: S608
        result: int = await self._submit("register", (name, kind, seq))
        return result

    async def ack(self, name: str, kind: Kind, seq: int) -> None:
        """The far side accepted everything up to ``seq``: move the cursor (never backwards)."""
        await self._submit("ack", (name, kind, seq))

    async def compact(self) -> dict[str, int]:
        result: dict[str, int] = await self._submit("compact", None)
        return result

    async def sync(self) -> None:
        """Wait until everything submitted before this call is committed."""
        await self._submit("sync", None)

    def cursor(self, name: str, kind: Kind) -> int:
        return self.stats.cursors.get(name, {}).get(kind, 0)

    def read_telemetry(self, after_seq: int, *, limit: int = 100) -> list[TelemetryBatch]:
        """Batches with ``seq > after_seq``, oldest first. Reads on a separate connection (WAL: never blocks)."""
        rows = self._reader.execute(
            "SELECT seq, created_ns, payload FROM telemetry WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
        ).fetchall()
        return [TelemetryBatch(seq, created, decode_samples(payload)) for seq, created, payload in rows]

    def read_events(self, after_seq: int, *, limit: int = 100) -> list[StoredEvent]:
        rows = self._reader.execute(
            "SELECT seq, created_ns, payload FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
        ).fetchall()
        return [StoredEvent(seq, created, decode_event(payload)) for seq, created, payload in rows]

    def last_seq(self, kind: Kind) -> int:
        table = "telemetry" if kind == "telemetry" else "events"
        return int(self._reader.execute(f"SELECT coalesce(max(seq), 0) FROM {table}").fetchone()[0])  # noqa: S608

    def writable(self) -> bool:
        """False when the last write failed (disk full, read-only): /readyz reports it."""
        return self.stats.last_error is None and not self._closed

    async def close(self) -> None:
        """Commit what is queued, stop the writer thread and close the database."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._db.close()
        self._reader.close()
