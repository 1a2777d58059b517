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

Budgets: telemetry over its byte budget drops the oldest batches first. ``dropped_samples`` counts only what some
uplink had not delivered yet (in total and per uplink cursor); rows every cursor had already passed are counted as
``compacted_samples``, like those ordinary compaction removes. Logging is once per pressure episode: the first drop
logs one WARNING (the budget and what was dropped); the episode ends when delivery (compaction) brings the store
back below three quarters of its budget, and one INFO line then sums it up (samples and batches dropped, how
long). Events are never dropped: over their budget, ``event_store_full`` is raised as an alarm flag,
``append_events`` keeps writing (an incentive record must not be lost because the link was down for a week) and the
overflow is taken from the telemetry budget instead, so back-pressure lands on the class that may lose data and the
disk use stays bounded by the sum of both budgets. A batch's or event's ``size`` includes its row's overhead on
disk, not only its payload.

Disk footprint: the WAL is checkpointed (``wal_autocheckpoint``) at ``wal_limit`` (an eighth of the telemetry
budget, 64 KiB to 4 MiB; SQLite's default let a 44 KiB budget's WAL reach 4 MB) and, after a commit that left it
that large, truncated (``wal_checkpoint(TRUNCATE)``). The database reuses the pages drops and compaction free, so
the files (``disk_usage()``: db, wal, shm, from the filesystem) stay within both budgets plus ``disk_margin``.

Cursors: an uplink's position is up to three rows in ``cursors`` (see ``UplinkCursor``): ``telemetry`` (everything
at or below it was delivered; compaction deletes up to the lowest of these), and, while a backlog is being replayed
behind live data, ``telemetry.gap`` (end of the backlog) and ``telemetry.live`` (how far live delivery got). They are
moved together in one transaction (``move_cursors``), so a ``kill -9`` at any point leaves a consistent position.

Durability levels (``durability=``): ``process`` is SQLite WAL with ``synchronous=NORMAL``: a committed append
survives a crash or ``kill -9`` of the gateway; a power cut may lose the last commits (never corrupts). ``power`` is
``synchronous=FULL``: one fsync per commit (commits are grouped, so per batch, not per sample), surviving a power
cut, at the cost of the storage's fsync latency (milliseconds on an SD card) on every commit group.

Imports nothing from the uplinks: they call ``read_telemetry``/``read_events`` and ``move_cursors``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, Protocol, TypeVar

import orjson

from gateway.errors import StoreError
from gateway.files import create_private_sqlite, ensure_private_dir
from gateway.model import Event, Quality, Sample

log = logging.getLogger(__name__)

Kind = Literal["telemetry", "events"]
#: the WAL is checkpointed and truncated once it reaches an eighth of the telemetry budget, within these bounds (the
#: upper one is about SQLite's own default checkpoint point, 1,000 pages)
WAL_LIMIT_MIN = 64 * 1024
WAL_LIMIT_MAX = 4 * 1024**2
#: SQLite page cache per connection (KiB; the outbox has two). SQLite's default, 2000 KiB, fills once a backlog
#: larger than that has passed through and then stays: about 4 MiB RSS for the two. Appends touch the b-tree's right
#: edge and reads go forward from a cursor, so beyond the interior pages the cache only saves a pread from the OS page
#: cache; at 512 KiB (128 pages) a 13 MiB backlog appends and reads back in the same CPU time (measured 2026-12-03,
#: bench/RESULTS.md) and the caches cost 1 MiB.
CACHE_KIB = 512
#: fixed part of the disk margin: the -shm index (32 KiB while the WAL stays under 4,096 pages), the schema's pages
#: and a batch in flight
DISK_OVERHEAD = 160 * 1024
#: what a row costs on disk beside its payload (key, the other columns, record and cell headers): counted in
#: ``size`` and so in the budgets, or a stream of one-sample batches (or of small events, whose id is also indexed)
#: would fill half as much again as its budget
ROW_OVERHEAD = 24
#: committed telemetry kept in memory for the uplinks' live reads (``Outbox._remember``): two seconds at 5,000
#: points/s, more than the uplinks' default request (2,000 and 5,000 samples)
RECENT_SAMPLES = 10_000
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
    # a sample without a reason (nearly all) is stored as the four fields it had before reasons existed
    return orjson.dumps([tuple(s) if s.reason is not None else s[:4] for s in samples])


def decode_samples(payload: bytes) -> list[Sample]:
    # tuple.__new__ builds the NamedTuple in C (every field given); Sample(...) would go through its Python-level
    # __new__, which costs more than the JSON decoding on a replay
    new, qualities = tuple.__new__, _QUALITIES
    return [
        new(Sample, (row[0], row[1], row[2], qualities[row[3]], row[4] if len(row) > 4 else None))
        for row in orjson.loads(payload)
    ]


def encode_event(event: Event) -> bytes:
    return orjson.dumps(
        {"id": event.id, "type": event.type, "subject": event.subject, "ts": event.ts, "body": event.body}
    )


def decode_event(payload: bytes) -> Event:
    raw = orjson.loads(payload)
    return Event(raw["id"], raw["type"], raw["subject"], raw["ts"], raw["body"])


def _format_duration(ns: int) -> str:
    seconds = ns // 10**9
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass(frozen=True, slots=True)
class TelemetryBatch:
    seq: int
    created_ns: int
    samples: list[Sample]


@dataclass(frozen=True, slots=True)
class UplinkCursor:
    """Where one uplink stands in the telemetry stream.

    Everything ``<= delivered_to`` was accepted by the far side. While a backlog is replayed behind live data,
    ``(delivered_to, gap_end]`` is that backlog, ``(gap_end, live_to]`` was delivered live and everything after
    ``live_to`` is still to send. Without a backlog the three are equal.
    """

    delivered_to: int = 0
    gap_end: int = 0
    live_to: int = 0

    @classmethod
    def from_positions(cls, positions: dict[str, int]) -> UplinkCursor:
        low = positions.get("telemetry", 0)
        gap = max(low, positions.get("telemetry.gap", 0))
        return cls(low, gap, max(gap, positions.get("telemetry.live", 0)))

    @property
    def has_backlog(self) -> bool:
        return self.delivered_to < self.gap_end

    def delivered(self, seq: int) -> bool:
        return seq <= self.delivered_to or self.gap_end < seq <= self.live_to


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
    #: removed by the budget before at least one uplink had delivered them (data lost to that uplink)
    dropped_samples: int = 0
    dropped_batches: int = 0
    #: removed after every uplink had delivered them (by compaction, or by the budget before compaction got there)
    compacted_samples: int = 0
    compacted_batches: int = 0
    #: samples dropped by the budget before this uplink cursor had delivered them
    dropped_by_cursor: dict[str, int] = field(default_factory=dict)
    appended_samples: int = 0
    appended_events: int = 0
    event_store_full: bool = False
    oldest_telemetry_ns: int | None = None
    last_error: str | None = None
    cursors: dict[str, dict[str, int]] = field(default_factory=dict)
    #: when the current budget-pressure episode began (its first drop), None when there is none
    pressure_since_ns: int | None = None


@dataclass(slots=True)
class _PressureEpisode:
    """Telemetry over its budget, from the first drop of undelivered data until delivery brings the store back
    below its low-water mark: logged once at the start and once at the end, not once per drop."""

    started_ns: int
    dropped_samples: int = 0
    dropped_batches: int = 0


# -- writer jobs -------------------------------------------------------------------------------------------------
# What the event loop asks of the writer thread: one small class per request, carrying exactly what it needs, and
# ``apply`` running it inside the writer's open transaction (on the writer thread, never on the event loop). The
# result type is the job's own, so ``await outbox._submit(job)`` is typed without a cast.

_R_co = TypeVar("_R_co", covariant=True)
_R = TypeVar("_R")


class _Job(Protocol[_R_co]):
    def apply(self, outbox: Outbox, now_ns: int) -> _R_co: ...


@dataclass(frozen=True, slots=True)
class _AppendSamples:
    blob: bytes
    count: int

    def apply(self, outbox: Outbox, now_ns: int) -> tuple[int, int]:
        """The row's (seq, created_ns)."""
        return outbox._insert_telemetry(self.blob, self.count, now_ns), now_ns


@dataclass(frozen=True, slots=True)
class _AppendEvents:
    #: (event id, event type, encoded event)
    rows: list[tuple[str, str, bytes]]

    def apply(self, outbox: Outbox, now_ns: int) -> int:
        return outbox._insert_events(self.rows, now_ns)


@dataclass(frozen=True, slots=True)
class _RegisterCursor:
    name: str
    kind: Kind
    seq: int

    def apply(self, outbox: Outbox, now_ns: int) -> int:
        return outbox._register_cursor(self.name, self.kind, self.seq)


@dataclass(frozen=True, slots=True)
class _MoveCursors:
    """One cursor (``ack``) or several of one uplink's (``move_cursors``), never backwards, in one transaction."""

    name: str
    #: cursor kind (``telemetry``, ``telemetry.gap``, ``telemetry.live``, ``events``) -> seq
    positions: tuple[tuple[str, int], ...]

    def apply(self, outbox: Outbox, now_ns: int) -> int:
        return outbox._move_cursors(self.name, self.positions)


@dataclass(frozen=True, slots=True)
class _Compact:
    def apply(self, outbox: Outbox, now_ns: int) -> dict[str, int]:
        return outbox._compact()


@dataclass(frozen=True, slots=True)
class _Sync:
    """Nothing to write: resolves once everything queued before it is committed."""

    def apply(self, outbox: Outbox, now_ns: int) -> None:
        return None


@dataclass(slots=True)
class _Queued(Generic[_R]):
    """A job in the writer's queue and the future (on its event loop) that waits for its result."""

    job: _Job[_R]
    future: asyncio.Future[_R]
    loop: asyncio.AbstractEventLoop
    #: the job's result, boxed (a job may return None), once ``run`` has applied it
    result: tuple[_R] | None = None

    def run(self, outbox: Outbox, now_ns: int) -> None:
        self.result = (self.job.apply(outbox, now_ns),)

    def settle(self, error: StoreError | None) -> None:
        """Hand the result (or ``error``) to the waiting coroutine, from the writer thread."""
        future, result = self.future, self.result

        def finish() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            elif result is not None:
                future.set_result(result[0])

        try:
            self.loop.call_soon_threadsafe(finish)
        except RuntimeError:
            pass  # the loop is gone (shutdown): nobody is waiting any more


class _Pending(Protocol):
    """What the writer thread sees of a ``_Queued`` job, whatever its result type."""

    def run(self, outbox: Outbox, now_ns: int) -> None: ...

    def settle(self, error: StoreError | None) -> None: ...


#: put on the queue by ``close``: the writer commits what came before it and ends
_STOP = None


class Outbox:
    """Durable store with one writer thread. Create with ``Outbox(path, ...)``; ``await close()`` when done."""

    def __init__(
        self,
        path: Path,
        *,
        durability: Literal["process", "power"] = "process",
        telemetry_budget: int = 256 * 1024**2,
        event_budget: int = 64 * 1024**2,
        time_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if telemetry_budget <= 0 or event_budget <= 0:
            raise ValueError("outbox budgets must be positive")
        self.path = Path(path)
        self.durability = durability
        self.telemetry_budget = telemetry_budget
        self.event_budget = event_budget
        self.wal_limit = min(max(telemetry_budget // 8, WAL_LIMIT_MIN), WAL_LIMIT_MAX)
        self._wal_path = self.path.with_name(self.path.name + "-wal")
        #: stamps ``created_ns`` (the age uplinks judge backfill by); a test passes its fake clock
        self.time_ns = time_ns
        try:
            ensure_private_dir(self.path.parent)
            # every reading passes through here (apartment meters too): the file and its -wal/-shm are 0600
            self._db = self._connect(create_private_sqlite)
            self._db.executescript(_SCHEMA)
            self._reader = self._connect(sqlite3.connect)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open outbox {self.path}: {exc}") from exc
        self.stats = OutboxStats()
        self._pressure: _PressureEpisode | None = None
        self._load_stats()
        self._jobs: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._closed = False
        self._append_listeners: list[Callable[[], None]] = []
        #: the newest committed telemetry rows, as appended: seq -> batch (see ``_remember``)
        self._recent: dict[int, TelemetryBatch] = {}
        self._recent_samples = 0
        #: the highest seq the budget has dropped (written by the writer thread): no recent row at or below it is used
        self._dropped_upto = 0
        # the default stack size on purpose: the 8 MiB is address space, not memory (the idle gateway's writer stack
        # is 12 KiB resident, 2026-12-03), and threading.stack_size would change it for every later thread too
        self._thread = threading.Thread(target=self._writer_loop, name="outbox-writer", daemon=True)
        self._thread.start()

    # -- connection ---------------------------------------------------------------------------------------------

    def _connect(self, connect: Callable[..., sqlite3.Connection]) -> sqlite3.Connection:
        db = connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed transaction survives a process crash; FULL adds an fsync per commit so it
        # also survives a power cut.
        db.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'power' else 'NORMAL'}")
        # SQLite's defaults let the WAL grow to 4 MB and never shrink it, whatever the budget: checkpoint it at our
        # limit, and truncate it to that limit whenever it is reset (see also ``_bound_wal``).
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        db.execute(f"PRAGMA wal_autocheckpoint={max(1, self.wal_limit // page_size)}")
        db.execute(f"PRAGMA journal_size_limit={self.wal_limit}")
        db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")  # negative: KiB, not pages
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
        self.stats.compacted_samples = counters.get("compacted_samples", 0)
        self.stats.compacted_batches = counters.get("compacted_batches", 0)
        self.stats.dropped_by_cursor = {
            name.removeprefix("dropped_samples:"): value
            for name, value in counters.items()
            if name.startswith("dropped_samples:")
        }
        for name, kind, seq in db.execute("SELECT name, kind, seq FROM cursors"):
            self.stats.cursors.setdefault(name, {})[kind] = seq
        self.stats.event_store_full = self.stats.event_bytes > self.event_budget
        self.stats.pressure_since_ns = self._pressure.started_ns if self._pressure else None

    # -- writer thread ------------------------------------------------------------------------------------------

    def _submit(self, job: _Job[_R]) -> asyncio.Future[_R]:
        if self._closed:
            raise StoreError("outbox is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_R] = loop.create_future()
        self._jobs.put(_Queued(job, future, loop))
        return future

    def _writer_loop(self) -> None:
        while True:
            first = self._jobs.get()
            if first is _STOP:
                return
            jobs: list[_Pending] = [first]
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

    def _run_jobs(self, jobs: list[_Pending]) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for job in jobs:
                job.run(self, self.time_ns())  # one clock reading per job, as before the jobs were typed
            self._db.execute("COMMIT")
            self.stats.last_error = None
            self._bound_wal()
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
            error = StoreError(message)
            for job in jobs:
                job.settle(error)
            return
        for job in jobs:
            job.settle(None)

    def _bound_wal(self) -> None:
        """After a commit: a WAL at its limit (a large transaction, or a checkpoint a reader held back) is copied
        into the database and truncated to zero now, so the files on disk stay within the budget plus the margin."""
        try:
            if os.stat(self._wal_path).st_size < self.wal_limit:
                return
            # A short wait only: a reader's snapshot must not stall the writer; the next commit tries again.
            self._db.execute("PRAGMA busy_timeout=100")
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                self._db.execute("PRAGMA busy_timeout=30000")
        except (sqlite3.Error, OSError):
            pass  # the data is committed; a checkpoint that failed now is retried after the next commit

    # -- what the jobs do (writer thread, inside its transaction) -------------------------------------------------

    def _insert_telemetry(self, blob: bytes, count: int, now_ns: int) -> int:
        size = len(blob) + ROW_OVERHEAD
        seq = self._db.execute(
            "INSERT INTO telemetry (created_ns, n, size, payload) VALUES (?, ?, ?, ?)",
            (now_ns, count, size, blob),
        ).lastrowid
        assert seq is not None  # an INSERT into a rowid table always has one
        self.stats.telemetry_batches += 1
        self.stats.telemetry_samples += count
        self.stats.telemetry_bytes += size
        self.stats.appended_samples += count
        if self.stats.oldest_telemetry_ns is None:
            self.stats.oldest_telemetry_ns = now_ns
        if self.stats.telemetry_bytes > self._effective_telemetry_budget():
            self._drop_oldest_telemetry()
        return seq

    def _insert_events(self, rows: list[tuple[str, str, bytes]], now_ns: int) -> int:
        added = 0
        for event_id, event_type, blob in rows:
            # the id is stored twice (the row and its unique index), each with a row's overhead
            size = len(blob) + 2 * (len(event_id.encode()) + ROW_OVERHEAD) + len(event_type.encode())
            cur = self._db.execute(
                "INSERT OR IGNORE INTO events (id, type, created_ns, size, payload) VALUES (?, ?, ?, ?, ?)",
                (event_id, event_type, now_ns, size, blob),
            )
            if cur.rowcount:
                added += 1
                self.stats.event_count += 1
                self.stats.event_bytes += size
        self.stats.appended_events += added
        full = self.stats.event_bytes > self.event_budget
        if full and not self.stats.event_store_full:
            log.error("event store over its budget (%d bytes): events are kept, link down too long?", self.event_budget)
        self.stats.event_store_full = full
        if full and self.stats.telemetry_bytes > self._effective_telemetry_budget():
            self._drop_oldest_telemetry()
        return added

    def _register_cursor(self, name: str, kind: Kind, seq: int) -> int:
        db = self._db
        db.execute("INSERT OR IGNORE INTO cursors (name, kind, seq) VALUES (?, ?, ?)", (name, kind, seq))
        stored: int = db.execute("SELECT seq FROM cursors WHERE name=? AND kind=?", (name, kind)).fetchone()[0]
        current = self.stats.cursors.setdefault(name, {})
        current[kind] = max(current.get(kind, 0), stored)
        return current[kind]

    def _move_cursors(self, name: str, positions: Sequence[tuple[str, int]]) -> int:
        """Move cursors forward (never backwards); returns the last one's position."""
        current = self.stats.cursors.setdefault(name, {})
        position = 0
        for kind, seq in positions:
            self._db.execute(
                "INSERT INTO cursors (name, kind, seq) VALUES (?, ?, ?) "
                "ON CONFLICT (name, kind) DO UPDATE SET seq = max(seq, excluded.seq)",
                (name, kind, seq),
            )
            position = current[kind] = max(current.get(kind, 0), seq)
        return position

    def _effective_telemetry_budget(self) -> int:
        """Events over their budget borrow from telemetry's (never below one batch: the newest is always kept)."""
        overflow = max(0, self.stats.event_bytes - self.event_budget)
        return max(0, self.telemetry_budget - overflow)

    def _drop_oldest_telemetry(self) -> None:
        """Delete oldest batches until under budget (keep at least the newest one). Runs in the writer's
        transaction, so the drop and its counters commit together."""
        db = self._db
        excess = self.stats.telemetry_bytes - self._effective_telemetry_budget()
        removed_batches = removed_samples = freed = 0
        last_seq = 0
        newest = db.execute("SELECT coalesce(max(seq), 0) FROM telemetry").fetchone()[0]
        removed_rows: list[tuple[int, int]] = []
        # Walk from the oldest in pages: the table may hold millions of rows, a full scan per append would not do.
        while freed < excess:
            page = db.execute(
                "SELECT seq, n, size FROM telemetry WHERE seq > ? AND seq < ? ORDER BY seq LIMIT 256",
                (last_seq, newest),
            ).fetchall()
            if not page:
                break
            for seq, n, size in page:
                if freed >= excess:
                    break
                freed += size
                removed_batches += 1
                removed_samples += n
                last_seq = seq
                removed_rows.append((seq, n))
        if not removed_batches:
            return
        db.execute("DELETE FROM telemetry WHERE seq <= ?", (last_seq,))
        # read by the event loop (an int assignment is atomic); set before the commit, so the recent rows never
        # serve a row that a commit has deleted (a rolled-back drop only sends a few reads to the database)
        self._dropped_upto = max(self._dropped_upto, last_seq)
        self.stats.telemetry_batches -= removed_batches
        self.stats.telemetry_samples -= removed_samples
        self.stats.telemetry_bytes -= freed
        cursors = {
            name: UplinkCursor.from_positions(positions)
            for name, positions in self.stats.cursors.items()
            if "telemetry" in positions  # an events-only cursor loses no telemetry
        }
        # A row every uplink has delivered is only compacted early; with no uplink at all, nothing was delivered.
        lost = [
            (seq, n) for seq, n in removed_rows if not cursors or not all(c.delivered(seq) for c in cursors.values())
        ]
        lost_samples = sum(n for _, n in lost)
        self.stats.dropped_batches += len(lost)
        self.stats.dropped_samples += lost_samples
        self.stats.compacted_batches += removed_batches - len(lost)
        self.stats.compacted_samples += removed_samples - lost_samples
        counters = {
            "dropped_samples": self.stats.dropped_samples,
            "dropped_batches": self.stats.dropped_batches,
            "compacted_samples": self.stats.compacted_samples,
            "compacted_batches": self.stats.compacted_batches,
        }
        for name, cursor in cursors.items():
            missed = sum(n for seq, n in lost if not cursor.delivered(seq))
            if missed:
                self.stats.dropped_by_cursor[name] = self.stats.dropped_by_cursor.get(name, 0) + missed
                counters[f"dropped_samples:{name}"] = self.stats.dropped_by_cursor[name]
        db.executemany("INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)", counters.items())
        oldest = db.execute("SELECT min(created_ns) FROM telemetry").fetchone()[0]
        self.stats.oldest_telemetry_ns = oldest
        if lost:
            self._note_drop(lost_samples, len(lost))

    def _note_drop(self, samples: int, batches: int) -> None:
        """Count a drop into the current pressure episode; the first one of an episode is the one WARNING."""
        episode = self._pressure
        if episode is None:
            episode = self._pressure = _PressureEpisode(self.time_ns())
            self.stats.pressure_since_ns = episode.started_ns
            log.warning(
                "telemetry store over its budget (%d bytes): dropped the oldest undelivered telemetry, %d samples in"
                " %d batch(es); further drops are counted, and summed up once the store is back below %d bytes",
                self._effective_telemetry_budget(),
                samples,
                batches,
                self._low_water(),
            )
        episode.dropped_samples += samples
        episode.dropped_batches += batches

    def _low_water(self) -> int:
        """The episode ends below this: a drop only frees room down to the budget, so only delivery gets here, and
        a store hovering at its budget is one episode, not one per append."""
        return self._effective_telemetry_budget() * 3 // 4

    def _end_pressure(self, *, closing: bool = False) -> None:
        episode = self._pressure
        if episode is None or (not closing and self.stats.telemetry_bytes > self._low_water()):
            return
        self._pressure = None
        self.stats.pressure_since_ns = None
        lasted = _format_duration(max(0, self.time_ns() - episode.started_ns))
        log.info(
            "telemetry store %s: %d samples (%d batches) dropped over budget in %s",
            "still over its budget at close" if closing else "back under its budget",
            episode.dropped_samples,
            episode.dropped_batches,
            lasted,
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
                if cur.rowcount:
                    self.stats.compacted_batches += cur.rowcount
                    self.stats.compacted_samples += n
                    db.executemany(
                        "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)",
                        (
                            ("compacted_samples", self.stats.compacted_samples),
                            ("compacted_batches", self.stats.compacted_batches),
                        ),
                    )
            else:
                size = db.execute("SELECT coalesce(sum(size), 0) FROM events WHERE seq <= ?", (low,)).fetchone()[0]
                cur = db.execute("DELETE FROM events WHERE seq <= ?", (low,))
                self.stats.event_count -= cur.rowcount
                self.stats.event_bytes -= size
                self.stats.event_store_full = self.stats.event_bytes > self.event_budget
            removed[kind] = cur.rowcount
        self._end_pressure()  # after events too: their compaction gives telemetry its borrowed room back
        return removed

    # -- public API ---------------------------------------------------------------------------------------------

    async def append(self, samples: Sequence[Sample]) -> None:
        """Store one batch of telemetry; returns once it is committed."""
        if not samples:
            return
        blob = encode_samples(samples)
        seq, created_ns = await self._submit(_AppendSamples(blob, len(samples)))
        self._remember(seq, created_ns, samples, blob)
        self._notify_appended()

    def _remember(self, seq: int, created_ns: int, samples: Sequence[Sample], blob: bytes) -> None:
        """Keep a committed row in memory for the uplinks' live reads (``read_telemetry_upto``).

        Reading back and decoding what was just written cost about 1 us per point at 5,000 points/s (issue 19):
        the uplinks read the live rows within a fraction of a second of their commit. A row is kept only if it reads
        back exactly as stored: JSON has no NaN or infinity (a value stored as one reads back None), so a row with
        such a value is left to the database. At most RECENT_SAMPLES are kept, oldest out first."""
        if b"null" in blob and any(type(s.value) is float and s.value - s.value != 0.0 for s in samples):
            return  # NaN or +-inf: stored as null
        recent = self._recent
        recent[seq] = TelemetryBatch(seq, created_ns, list(samples))
        self._recent_samples += len(samples)
        while self._recent_samples > RECENT_SAMPLES and len(recent) > 1:
            oldest = next(iter(recent))
            self._recent_samples -= len(recent.pop(oldest).samples)

    async def append_events(self, events: Sequence[Event]) -> int:
        """Store events (idempotent by id); returns how many were new."""
        if not events:
            return 0
        rows = [(e.id, e.type, encode_event(e)) for e in events]
        result = await self._submit(_AppendEvents(rows))
        if result:
            self._notify_appended()
        return result

    def add_append_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) after each committed append: uplinks wake on it instead of
        polling."""
        self._append_listeners.append(callback)

    def _notify_appended(self) -> None:
        for callback in self._append_listeners:
            callback()

    async def register_cursor(self, name: str, kind: Kind, *, start: Literal["beginning", "end"] = "beginning") -> int:
        """Create the cursor of a new uplink (idempotent); returns its position."""
        seq = 0
        if start == "end":
            table = "telemetry" if kind == "telemetry" else "events"
            seq = self._reader.execute(f"SELECT coalesce(max(seq), 0) FROM {table}").fetchone()[0]  # noqa: S608
        return await self._submit(_RegisterCursor(name, kind, seq))

    async def ack(self, name: str, kind: Kind, seq: int) -> None:
        """The far side accepted everything up to ``seq``: move the cursor (never backwards)."""
        await self._submit(_MoveCursors(name, ((kind, seq),)))

    async def move_cursors(self, name: str, positions: dict[str, int]) -> None:
        """Move several of one uplink's cursors in one transaction (never backwards); keys are cursor kinds
        (``telemetry``, ``telemetry.gap``, ``telemetry.live``, ``events``)."""
        await self._submit(_MoveCursors(name, tuple(positions.items())))

    def uplink_cursor(self, name: str) -> UplinkCursor:
        return UplinkCursor.from_positions(self.stats.cursors.get(name, {}))

    def pending_telemetry(self, after_seq: int, upto_seq: int | None = None) -> tuple[int, int | None]:
        """Samples stored with ``after_seq < seq <= upto_seq`` and the creation time of the oldest (or None)."""
        self._check_open()
        if upto_seq is None:
            row = self._reader.execute(
                "SELECT coalesce(sum(n), 0), min(created_ns) FROM telemetry WHERE seq > ?", (after_seq,)
            ).fetchone()
        else:
            row = self._reader.execute(
                "SELECT coalesce(sum(n), 0), min(created_ns) FROM telemetry WHERE seq > ? AND seq <= ?",
                (after_seq, upto_seq),
            ).fetchone()
        return int(row[0]), row[1]

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("outbox is closed")

    def pending_events(self, after_seq: int) -> tuple[int, int | None]:
        self._check_open()
        row = self._reader.execute(
            "SELECT count(*), min(created_ns) FROM events WHERE seq > ?", (after_seq,)
        ).fetchone()
        return int(row[0]), row[1]

    def read_telemetry_upto(self, after_seq: int, *, upto_seq: int | None, max_samples: int) -> list[TelemetryBatch]:
        """Stored batches after ``after_seq`` (and at most ``upto_seq``), oldest first, until ``max_samples`` are
        collected (at least one batch, however large). Rows still in memory (``_remember``) are served from there,
        in seq order; from the first row that is not (older, or not kept), the rest come from the database."""
        out: list[TelemetryBatch] = []
        total = 0
        seq = after_seq
        recent = self._recent
        if after_seq >= self._dropped_upto:
            while upto_seq is None or seq < upto_seq:
                batch = recent.get(seq + 1)
                if batch is None:
                    break
                n = len(batch.samples)
                if out and total + n > max_samples:
                    return out
                out.append(batch)
                total += n
                seq += 1
                if total >= max_samples:
                    return out
            if upto_seq is not None and seq >= upto_seq:
                return out
        sql = "SELECT seq, created_ns, n, payload FROM telemetry WHERE seq > ?"
        params: tuple[int, ...] = (seq,)
        if upto_seq is not None:
            sql += " AND seq <= ?"
            params = (seq, upto_seq)
        rows = self._reader.execute(sql + " ORDER BY seq", params)
        try:
            for row_seq, created, n, payload in rows:
                if out and total + n > max_samples:
                    break
                out.append(TelemetryBatch(row_seq, created, decode_samples(payload)))
                total += n
                if total >= max_samples:
                    break
        finally:
            rows.close()  # release the read snapshot now, so WAL checkpoints are not held back
        return out

    async def compact(self) -> dict[str, int]:
        return await self._submit(_Compact())

    async def sync(self) -> None:
        """Wait until everything submitted before this call is committed."""
        await self._submit(_Sync())

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

    def has_event(self, event_id: str) -> bool:
        """True when an event with this id was ever stored and not yet compacted away."""
        return self._reader.execute("SELECT 1 FROM events WHERE id = ?", (event_id,)).fetchone() is not None

    def last_seq(self, kind: Kind) -> int:
        table = "telemetry" if kind == "telemetry" else "events"
        return int(self._reader.execute(f"SELECT coalesce(max(seq), 0) FROM {table}").fetchone()[0])  # noqa: S608

    def disk_usage(self) -> dict[str, int]:
        """Bytes of the store's files as the filesystem reports them: ``db``, ``wal`` and ``shm`` (0 when absent)."""
        usage = {}
        for name, suffix in (("db", ""), ("wal", "-wal"), ("shm", "-shm")):
            try:
                usage[name] = os.stat(self.path.with_name(self.path.name + suffix)).st_size
            except FileNotFoundError:
                usage[name] = 0
        return usage

    @property
    def disk_margin(self) -> int:
        """What the files may hold beyond the budgets: the WAL up to its limit, the -shm index, the schema and the
        b-trees' partly filled pages."""
        return self.wal_limit + DISK_OVERHEAD + (self.telemetry_budget + self.event_budget) // 8

    @property
    def writer_native_id(self) -> int | None:
        """The OS thread id of the writer thread (benchmarks read its CPU time from /proc)."""
        return self._thread.native_id

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
        self._end_pressure(closing=True)
        self._db.close()
        self._reader.close()
