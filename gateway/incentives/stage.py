"""The incentive ledger: meter readings in, one signed record per account and interval out.

Owns the ledger's SQLite file (``<data_dir>/incentives.db``): readings not yet consumed, the reading fixed at each
meter's last closed edge, each account's next interval, and every issued record with its sequence number and hash.
That file is the source of truth for exactly-once issuing: a record, the cursor move, the fixed edges and the chain
head are written in one transaction, so after ``kill -9`` an interval is either issued (and never again) or not
(and is issued after restart with the same id, because the id depends only on account and interval).

Delivery is separate from issuing: the events returned by ``process``/``tick`` go to the outbox, which ignores ids it
already holds. A crash between issuing and the outbox commit is covered by re-emitting, on the first call after
``open``, every record issued in the ``REPLAY_WINDOW_NS`` before the last one (same id, same bytes).

Closing an interval: at ``end + edge_tolerance`` when every meter has readings at both edges; otherwise it waits for
late (backfilled) readings until ``end + max_delay`` and is then issued as incomplete (never rewarded). Intervals
of one account close in order; records are chained across all accounts in the order they are issued.

Imports the config, the pure energy/baseline/record modules and SQLite; never a protocol library, the bus or the
outbox (the supervisor connects them).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.config.site import Site
from gateway.errors import ConfigError, StoreError
from gateway.incentives.baseline import BaselineValue, clock_time, compute_baseline, local_start
from gateway.incentives.config import Baseline, IncentivesConfig, validate_against
from gateway.incentives.energy import (
    MICRO,
    MeterInterval,
    MeterRules,
    Reading,
    Replacement,
    format_micro,
    meter_interval,
    to_micro_kwh,
)
from gateway.incentives.record import (
    GENESIS_HASH,
    SCHEMA_ID,
    KeyFileError,
    Pseudonymizer,
    key_id,
    load_private_key,
    load_pseudonym_key,
    public_key_path_for,
    record_hash,
    record_id,
    sign,
    write_pseudonym_key,
    write_signing_key,
)
from gateway.model import Event, Quality, Sample

log = logging.getLogger(__name__)

NS = 1_000_000_000
LEDGER_FILE = "incentives.db"
#: records issued this long before the newest one are handed out again after a restart (the outbox dedupes by id)
REPLAY_WINDOW_NS = 10 * 60 * NS
#: records issued by one call at most: after a long outage the backlog of (incomplete) intervals is issued over the
#: next calls instead of blocking the event loop for a minute; the order stays the same
MAX_RECORDS_PER_CALL = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    point TEXT NOT NULL, ts_ns INTEGER NOT NULL, micro_kwh INTEGER NOT NULL,
    PRIMARY KEY (point, ts_ns)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meter_edges (
    point TEXT PRIMARY KEY, edge_ns INTEGER NOT NULL, ts_ns INTEGER NOT NULL, micro_kwh INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (account TEXT PRIMARY KEY, next_start_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    account TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    micro_kwh INTEGER NOT NULL,
    usable INTEGER NOT NULL,
    issued_ns INTEGER NOT NULL,
    hash TEXT NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (account, start_ns)
);
"""


@dataclass(frozen=True, slots=True)
class _Account:
    real_id: str
    pseudonym: str
    meters: tuple[str, ...]
    rules: dict[str, MeterRules]
    baseline: Baseline


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns // NS, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ns % NS == 0 else _iso_frac(ns)


def _iso_frac(ns: int) -> str:
    seconds, rest = divmod(ns, NS)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{rest:09d}".rstrip("0") + "Z"


def _micro_of(kwh: Decimal) -> int:
    return int((kwh * MICRO).to_integral_value(rounding=ROUND_HALF_EVEN))


def _times_factor(micro: int, factor: Decimal) -> int:
    return int((Decimal(micro) * factor).to_integral_value(rounding=ROUND_HALF_EVEN))


class IncentiveStage:
    """See the module docstring. Not thread-safe by design of the caller; a lock guards the connection anyway."""

    def __init__(
        self,
        *,
        config: IncentivesConfig,
        gateway_id: str,
        site_id: str,
        zone: ZoneInfo,
        db: sqlite3.Connection,
        signing_key: Ed25519PrivateKey,
        pseudonyms: Pseudonymizer,
    ) -> None:
        self.config = config
        self.gateway_id = gateway_id
        self.site_id = site_id
        self.zone = zone
        self._db = db
        self._lock = threading.Lock()
        self._signing_key = signing_key
        self._key_id = key_id(signing_key.public_key())
        self._interval_ns = config.interval_ns
        self._tolerance_ns = int(config.edge_tolerance * NS)
        self._max_delay_ns = int(config.max_delay * NS)
        #: counters for the status page: samples ignored and why
        self.counters: dict[str, int] = {"late_dropped": 0, "invalid": 0, "not_good": 0, "duplicates": 0}
        self._accounts = [self._plan_account(a, pseudonyms) for a in config.accounts]
        self._account_of = {meter: acc for acc in self._accounts for meter in acc.meters}
        self._meter_ids = {meter: pseudonyms.meter(meter) for acc in self._accounts for meter in acc.meters}
        self._clock_ns = 0
        #: account -> start of the interval last found incomplete; recomputed only when new readings arrive
        self._found_incomplete: dict[str, int] = {}
        self._load_state()

    def _plan_account(self, account: Any, pseudonyms: Pseudonymizer) -> _Account:
        config = self.config
        wrap = _micro_of(config.counter.wrap_kwh) if config.counter is not None else None
        max_kw = account.max_power_kw if account.max_power_kw is not None else config.max_power_kw
        rules = {}
        for meter in account.meters:
            swaps = tuple(
                Replacement(
                    r.at_ns,
                    _micro_of(r.old_final_kwh) if r.old_final_kwh is not None else None,
                    _micro_of(r.new_initial_kwh) if r.new_initial_kwh is not None else None,
                )
                for r in account.replacements
                if r.point == meter
            )
            rules[meter] = MeterRules(wrap_micro=wrap, max_power_kw=max_kw, replacements=swaps)
        return _Account(
            real_id=account.id,
            pseudonym=pseudonyms.account(account.id),
            meters=tuple(account.meters),
            rules=rules,
            baseline=account.baseline if account.baseline is not None else config.baseline,
        )

    # -- opening ----------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, site: Site, data_dir: Path) -> IncentiveStage:
        """Open (or create) the ledger in ``data_dir``; ConfigError for bad config or keys, StoreError for the file."""
        config = site.config.incentives
        if config is None:
            raise ConfigError([site.diagnostic((), "the site file has no incentives: section")])
        problems = validate_against(site)
        if problems:
            raise ConfigError(problems)
        data_dir = Path(data_dir)
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(data_dir / LEDGER_FILE, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            sync = "FULL" if site.config.storage.durability == "power" else "NORMAL"
            db.execute(f"PRAGMA synchronous={sync}")
            db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the incentive ledger in {data_dir}: {exc}") from exc
        try:
            signing_key, pseudonyms = _load_keys(site, config, data_dir, db)
            _check_pseudonym_key(site, db, pseudonyms)
        except ConfigError:
            db.close()
            raise
        zone = ZoneInfo(config.timezone or site.config.gateway.timezone)
        return cls(
            config=config,
            gateway_id=site.config.gateway.id,
            site_id=site.config.gateway.site,
            zone=zone,
            db=db,
            signing_key=signing_key,
            pseudonyms=pseudonyms,
        )

    def _load_state(self) -> None:
        db = self._db
        self._cursor: dict[str, int | None] = {a.pseudonym: None for a in self._accounts}
        for account, start in db.execute("SELECT account, next_start_ns FROM cursors"):
            if account in self._cursor:
                self._cursor[account] = start
        self._issued_any = {
            row[0] for row in db.execute("SELECT DISTINCT account FROM records") if row[0] in self._cursor
        }
        self._fixed: dict[str, tuple[int, Reading]] = {}
        for point, edge_ns, ts_ns, micro in db.execute("SELECT point, edge_ns, ts_ns, micro_kwh FROM meter_edges"):
            self._fixed[point] = (edge_ns, Reading(ts_ns, micro))
        head = db.execute("SELECT seq, hash, issued_ns FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        self._seq: int = head[0] if head else 0
        self._head_hash: str = head[1] if head else GENESIS_HASH
        self._replay: list[Event] = []
        #: issued (committed to the ledger) but not yet handed to the caller: survives an exception mid-call, so a
        #: record committed just before a failure is returned by the next call instead of being lost
        self._pending: list[Event] = []
        if head:
            rows = db.execute(
                "SELECT body FROM records WHERE issued_ns >= ? ORDER BY seq", (head[2] - REPLAY_WINDOW_NS,)
            )
            self._replay = [self._event(orjson.loads(body)) for (body,) in rows]

    # -- the stage --------------------------------------------------------------------------------------------

    def process(self, batch: Sequence[Sample]) -> list[Event]:
        """Store the meter readings in ``batch``; return the records of intervals that closed (by sample time)."""
        rows: list[tuple[str, int, int]] = []
        clock = self._clock_ns
        for sample in batch:
            account = self._account_of.get(sample.point)
            if account is None:
                continue
            if sample.quality != Quality.GOOD:
                self.counters["not_good"] += 1
                continue
            micro = to_micro_kwh(sample.value)
            if micro is None:
                self.counters["invalid"] += 1
                continue
            fixed = self._fixed.get(sample.point)
            if fixed is not None and sample.ts <= fixed[1].ts_ns:
                self.counters["late_dropped"] += 1  # older than a closed edge: its interval is already issued
                continue
            rows.append((sample.point, sample.ts, micro))
            clock = max(clock, sample.ts)
        with self._lock:
            if rows:
                self._store_readings(rows)
            return self._hand_out(clock)

    def tick(self, now_ns: int) -> list[Event]:
        """Close intervals on time even when no reading arrives (a dead meter still gets its incomplete record)."""
        with self._lock:
            return self._hand_out(max(self._clock_ns, now_ns))

    def _hand_out(self, now_ns: int) -> list[Event]:
        self._pending.extend(self._take_replay())
        self._close_due(now_ns)  # appends each record to _pending as soon as the ledger has committed it
        events, self._pending = self._pending, []
        return events

    def records_of_day(self, day: date | str) -> list[dict[str, Any]]:
        """Records whose interval starts on ``day`` (local to the incentives zone), in issue order."""
        if isinstance(day, str):
            day = date.fromisoformat(day)
        first = int(datetime.combine(day, datetime.min.time(), tzinfo=self.zone).timestamp()) * NS
        after = int(datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=self.zone).timestamp()) * NS
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM records WHERE start_ns >= ? AND start_ns < ? ORDER BY seq", (first, after)
            ).fetchall()
        return [orjson.loads(body) for (body,) in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- readings ---------------------------------------------------------------------------------------------

    def _store_readings(self, rows: list[tuple[str, int, int]]) -> None:
        grid = self._interval_ns
        moved: dict[str, int] = {}
        for point, ts_ns, _ in rows:
            account = self._account_of[point]
            self._found_incomplete.pop(account.pseudonym, None)
            floor = ts_ns - ts_ns % grid
            if ts_ns - floor > self._tolerance_ns:
                floor += grid  # an account's first interval starts at an edge this reading can cover
            current = moved.get(account.pseudonym, self._cursor[account.pseudonym])
            # before the first record an earlier (backfilled) reading may still move the start back
            if current is None or (floor < current and account.pseudonym not in self._issued_any):
                moved[account.pseudonym] = floor
        try:
            with self._db:
                self._db.execute("BEGIN")
                before = self._db.total_changes
                self._db.executemany("INSERT OR IGNORE INTO readings (point, ts_ns, micro_kwh) VALUES (?, ?, ?)", rows)
                self.counters["duplicates"] += len(rows) - (self._db.total_changes - before)
                self._db.executemany(
                    "INSERT INTO cursors (account, next_start_ns) VALUES (?, ?) "
                    "ON CONFLICT (account) DO UPDATE SET next_start_ns = excluded.next_start_ns",
                    list(moved.items()),
                )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot store meter readings in the incentive ledger: {exc}") from exc
        self._cursor.update(moved)

    def _readings(self, point: str, start_ns: int, end_ns: int, fixed: Reading | None) -> list[Reading]:
        """The readings that can matter for ``[start, end)``: from the start candidate to the first after the end."""
        db = self._db
        if fixed is not None:
            low = fixed.ts_ns
        else:
            before = db.execute(
                "SELECT MAX(ts_ns) FROM readings WHERE point = ? AND ts_ns <= ?", (point, start_ns)
            ).fetchone()[0]
            low = before if before is not None else start_ns
        high = max(end_ns, low)
        rows = db.execute(
            "SELECT ts_ns, micro_kwh FROM readings WHERE point = ? AND ts_ns >= ? AND ts_ns <= ? ORDER BY ts_ns",
            (point, low, high),
        ).fetchall()
        after = db.execute(
            "SELECT ts_ns, micro_kwh FROM readings WHERE point = ? AND ts_ns > ? ORDER BY ts_ns LIMIT 1", (point, high)
        ).fetchone()
        if after is not None:
            rows.append(after)
        return [Reading(ts, micro) for ts, micro in rows]

    # -- closing intervals ------------------------------------------------------------------------------------

    def _close_due(self, now_ns: int) -> list[Event]:
        self._clock_ns = now_ns
        events: list[Event] = []
        interval, tolerance = self._interval_ns, self._tolerance_ns
        waiting: set[str] = set()
        while len(events) < MAX_RECORDS_PER_CALL:
            due = [
                (start, index, account)
                for index, account in enumerate(self._accounts)
                if (start := self._cursor[account.pseudonym]) is not None
                and now_ns >= start + interval + tolerance
                and account.pseudonym not in waiting
            ]
            if not due:
                break
            start, _, account = min(due, key=lambda item: (item[0], item[1]))
            end = start + interval
            overdue = now_ns >= end + self._max_delay_ns
            if not overdue and self._found_incomplete.get(account.pseudonym) == start:
                waiting.add(account.pseudonym)  # nothing new since it was last found incomplete
                continue
            meters = {point: self._meter_interval(point, start, end) for point in account.meters}
            if not overdue and not all(m.complete for m in meters.values()):
                self._found_incomplete[account.pseudonym] = start
                waiting.add(account.pseudonym)
                continue
            event = self._issue(account, start, end, meters)
            events.append(event)
            self._pending.append(event)
        return events

    def _meter_interval(self, point: str, start_ns: int, end_ns: int) -> MeterInterval:
        fixed_entry = self._fixed.get(point)
        fixed = fixed_entry[1] if fixed_entry is not None and fixed_entry[0] == start_ns else None
        readings = self._readings(point, start_ns, end_ns, fixed)
        account = self._account_of[point]
        return meter_interval(
            readings, start_ns, end_ns, tolerance_ns=self._tolerance_ns, rules=account.rules[point], fixed_start=fixed
        )

    def _history(self, account: str) -> Any:
        def lookup(starts: Sequence[int]) -> dict[int, int]:
            if not starts:
                return {}
            marks = ",".join("?" * len(starts))
            rows = self._db.execute(
                f"SELECT start_ns, micro_kwh FROM records WHERE account = ? AND usable = 1 AND start_ns IN ({marks})",  # noqa: S608 - placeholders only
                (account, *starts),
            )
            return dict(rows.fetchall())

        return lookup

    def _issue(self, account: _Account, start: int, end: int, meters: dict[str, MeterInterval]) -> Event:
        energy = sum(m.micro_kwh for m in meters.values())
        complete = all(m.complete for m in meters.values())
        blocked = any(m.blocked for m in meters.values())
        notes = sorted({note for m in meters.values() for note in m.notes})
        usable = complete and not blocked
        baseline: BaselineValue | None = compute_baseline(
            account.baseline, start, self._interval_ns, self.zone, self._history(account.pseudonym)
        )
        saving = 0
        if not complete:
            status = "incomplete"
        elif blocked:
            status = "discontinuity"
        elif baseline is None:
            status = "no_baseline"
        else:
            saving = max(0, baseline.micro_kwh - energy)
            status = "saving" if saving > 0 else "no_saving"
        factor = self.config.emission_factor.at(clock_time(start, self.zone))
        record: dict[str, Any] = {
            "schema": SCHEMA_ID,
            "id": record_id(self.gateway_id, account.pseudonym, start),
            "seq": self._seq + 1,
            "prev_hash": self._head_hash,
            "gateway": self.gateway_id,
            "site": self.site_id,
            "account": account.pseudonym,
            "interval": {
                "start": _iso(start),
                "end": _iso(end),
                "local_start": local_start(start, self.zone).isoformat(),
            },
            "complete": complete,
            "status": status,
            "notes": notes,
            "meters": [self._meter_entry(point, m) for point, m in meters.items()],
            "energy_kwh": format_micro(energy),
            "baseline": None
            if baseline is None
            else {"method": baseline.method, "kwh": format_micro(baseline.micro_kwh), "days_used": baseline.days_used},
            "saving_kwh": format_micro(saving),
            "emission_factor_kg_per_kwh": str(factor),
            "co2e_kg": format_micro(_times_factor(energy, factor)),
            "co2e_saved_kg": format_micro(_times_factor(saving, factor)),
            "key_id": self._key_id,
        }
        record["signature"] = sign(record, self._signing_key)
        digest = record_hash(record)
        body = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute(
                    "INSERT INTO records (seq, id, account, start_ns, micro_kwh, usable, issued_ns, hash, body) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record["seq"],
                        record["id"],
                        account.pseudonym,
                        start,
                        energy,
                        int(usable),
                        self._clock_ns,
                        digest,
                        body,
                    ),
                )
                self._db.execute(
                    "INSERT INTO cursors (account, next_start_ns) VALUES (?, ?) "
                    "ON CONFLICT (account) DO UPDATE SET next_start_ns = excluded.next_start_ns",
                    (account.pseudonym, end),
                )
                for point, m in meters.items():
                    if m.end is None:
                        continue
                    self._db.execute(
                        "INSERT INTO meter_edges (point, edge_ns, ts_ns, micro_kwh) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (point) DO UPDATE SET edge_ns = excluded.edge_ns, ts_ns = excluded.ts_ns, "
                        "micro_kwh = excluded.micro_kwh",
                        (point, end, m.end.ts_ns, m.end.micro_kwh),
                    )
                    # readings before the fixed edge can never be used again
                    self._db.execute("DELETE FROM readings WHERE point = ? AND ts_ns < ?", (point, m.end.ts_ns))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write an incentive record to the ledger: {exc}") from exc
        self._seq, self._head_hash = record["seq"], digest
        self._cursor[account.pseudonym] = end
        self._issued_any.add(account.pseudonym)
        for point, m in meters.items():
            if m.end is not None:
                self._fixed[point] = (end, m.end)
        return self._event(orjson.loads(body))

    def _meter_entry(self, point: str, interval: MeterInterval) -> dict[str, Any]:
        def reading(r: Reading | None) -> dict[str, str] | None:
            return None if r is None else {"ts": _iso(r.ts_ns), "kwh": format_micro(r.micro_kwh)}

        return {
            "meter": self._meter_ids[point],
            "start": reading(interval.start),
            "end": reading(interval.end),
            "kwh": format_micro(interval.micro_kwh),
            "complete": interval.complete,
            "notes": list(interval.notes),
        }

    def _event(self, record: dict[str, Any]) -> Event:
        end = datetime.strptime(record["interval"]["end"][:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
        return Event(
            id=record["id"], type="incentive", subject=record["account"], ts=int(end.timestamp()) * NS, body=record
        )

    def _take_replay(self) -> list[Event]:
        replay, self._replay = self._replay, []
        if replay:
            log.info("re-emitting %d incentive record(s) issued just before the last stop", len(replay))
        return replay


# -- keys -------------------------------------------------------------------------------------------------------------


def _resolve(data_dir: Path, path: Path) -> Path:
    return path if path.is_absolute() else data_dir / path


def _load_keys(
    site: Site, config: IncentivesConfig, data_dir: Path, db: sqlite3.Connection
) -> tuple[Ed25519PrivateKey, Pseudonymizer]:
    signing_path = _resolve(data_dir, config.signing_key_file)
    pseudonym_path = _resolve(data_dir, config.pseudonym_key_file)
    missing = [p for p in (signing_path, pseudonym_path) if not p.exists()]
    if missing and config.generate_missing_keys:
        if db.execute("SELECT 1 FROM records LIMIT 1").fetchone() is not None:
            names = ", ".join(str(p) for p in missing)
            raise ConfigError(
                [
                    site.diagnostic(
                        ("incentives", "generate_missing_keys"),
                        f"key file(s) {names} missing but the ledger already holds records: restore them from "
                        "backup (new keys would break the chain's pseudonyms)",
                    )
                ]
            )
        if signing_path in missing:
            write_signing_key(signing_path, public_key_path_for(signing_path))
            log.warning("generated a new incentive signing key %s (public key beside it)", signing_path)
        if pseudonym_path in missing:
            write_pseudonym_key(pseudonym_path)
            log.warning("generated a new incentive pseudonym key %s", pseudonym_path)
    try:
        signing_key = load_private_key(signing_path)
    except KeyFileError as exc:
        raise ConfigError([site.diagnostic(("incentives", "signing_key_file"), str(exc))]) from None
    try:
        pseudonyms = Pseudonymizer(load_pseudonym_key(pseudonym_path))
    except KeyFileError as exc:
        raise ConfigError([site.diagnostic(("incentives", "pseudonym_key_file"), str(exc))]) from None
    return signing_key, pseudonyms


def _check_pseudonym_key(site: Site, db: sqlite3.Connection, pseudonyms: Pseudonymizer) -> None:
    row = db.execute("SELECT value FROM meta WHERE key = 'pseudonym_key'").fetchone()
    if row is None:
        with db:
            db.execute("INSERT INTO meta (key, value) VALUES ('pseudonym_key', ?)", (pseudonyms.fingerprint,))
        return
    if row[0] != pseudonyms.fingerprint:
        raise ConfigError(
            [
                site.diagnostic(
                    ("incentives", "pseudonym_key_file"),
                    "this pseudonym key is not the one the ledger was started with: accounts would get new "
                    "pseudonyms and lose their baselines (restore the original key)",
                )
            ]
        )
