"""The incentive stage: meter readings in, signed records of schema 2 out (``docs/incentives.md``).

Owns the decisions: which readings are refused (invalid, future, late, duplicate) and counted, when an interval
closes, which flags it gets, its baseline, delta and saving, the daily settlement, the epoch records, and the
chain-head checkpoint. The arithmetic of one meter lives in ``energy``, baselines in ``baseline``, the programme in
``programme``, storage in ``ledger``; this module puts them together.

Time: ``process(batch, now_ns)`` and ``tick(now_ns)`` take the gateway's clock as an argument (a fake one in tests,
CSV time in ``incentives test``). A reading stamped beyond ``max_clock_skew`` ahead of it is refused, so one bad
timestamp can no longer close a day of junk intervals. An interval closes ``settle`` after its end when every meter
has a reading at or after the end, or ``max_delay`` after its end regardless (then flagged ``gap``).

Delivery is separate from issuing: the events returned go to the outbox, which ignores ids it already holds. A crash
between issuing and the outbox commit is covered by re-emitting, on the first call after ``open``, every record issued
in the ``REPLAY_WINDOW_NS`` before the last one (same id, same bytes).

Imports the config, the pure modules, the ledger and the record module; never a protocol library, the bus or the
outbox (the supervisor connects them).
"""

from __future__ import annotations

import logging
import threading
import time as time_module
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.config.site import Site
from gateway.errors import ConfigError
from gateway.incentives.baseline import BaselineValue, clock_time, compute_baseline, local_start
from gateway.incentives.config import IncentivesConfig, validate_against
from gateway.incentives.energy import (
    CLOCK,
    GAP,
    RESOLUTION,
    STUCK,
    Anchor,
    MeterInterval,
    Reading,
    counted_beyond,
    first_anchor,
    format_micro,
    meter_interval,
    resolution_step,
    to_micro_kwh,
)
from gateway.incentives.ledger import IssueCommit, Ledger, StoredRecord
from gateway.incentives.programme import AccountPlan, Programme, build_programme, describe_change, iso_ns
from gateway.incentives.record import (
    GENESIS_HASH,
    SCHEMA_ID,
    KeyFileError,
    Pseudonymizer,
    epoch_id,
    key_id,
    load_private_key,
    load_pseudonym_key,
    make_checkpoint,
    public_key_path_for,
    record_hash,
    record_id,
    settlement_id,
    sign,
    write_pseudonym_key,
    write_signing_key,
)
from gateway.model import Event, Quality, Sample

log = logging.getLogger(__name__)

NS = 1_000_000_000
#: records issued this long before the newest one are handed out again after a restart (the outbox dedupes by id)
REPLAY_WINDOW_NS = 10 * 60 * NS
#: records issued by one call at most: after a long outage the backlog of (incomplete) intervals is issued over the
#: next calls instead of blocking the event loop for a minute; the order stays the same
MAX_RECORDS_PER_CALL = 200
#: the gateway's clock going back by more than this between two calls is a clock step, not jitter
CLOCK_STEP_NS = 2 * NS
#: readings fetched beyond an interval's end: the first at or after it, and two to judge whether it is an outlier
_EXTRA_READINGS = 3

#: why readings were refused or ignored, as counted for the status page and /metrics
COUNTER_NAMES = ("late_dropped", "invalid", "future", "not_good", "duplicates", "clock_steps")


class ProgrammeChanged(ConfigError):
    """The site's money settings differ from the epoch in force: an operator must start a new epoch."""


@dataclass(frozen=True, slots=True)
class _Epoch:
    number: int
    programme: Programme


@dataclass(frozen=True, slots=True)
class _IntervalFigures:
    """What the stage decided about one account's interval, before any of it is written as text."""

    #: one body entry per meter (``_meter_entry``)
    entries: list[dict[str, Any]]
    flags: set[str]
    notes: set[str]
    #: meter -> where its next interval starts (meters that sent nothing keep theirs)
    anchors: dict[str, Anchor]
    baseline: BaselineValue | None
    status: str
    energy: int
    delta: int
    saving: int
    factor: Decimal


def _times(micro: int, factor: Decimal) -> int:
    return int((Decimal(micro) * factor).to_integral_value(rounding=ROUND_HALF_EVEN))


def _reading(reading: Reading) -> dict[str, str]:
    return {"ts": iso_ns(reading.ts_ns), "kwh": format_micro(reading.micro_kwh)}


class IncentiveStage:
    """See the module docstring. A lock guards the ledger; the caller may use one thread or several."""

    def __init__(
        self,
        *,
        config: IncentivesConfig,
        programme: Programme,
        epoch: int,
        gateway_id: str,
        site_id: str,
        zone: ZoneInfo,
        ledger: Ledger,
        signing_key: Ed25519PrivateKey,
        pseudonyms: Pseudonymizer,
    ) -> None:
        self.config = config
        self.gateway_id = gateway_id
        self.site_id = site_id
        self.zone = zone
        self._ledger = ledger
        self._lock = threading.Lock()
        self._signing_key = signing_key
        self._key_id = key_id(signing_key.public_key())
        self._epoch = _Epoch(epoch, programme)
        self._interval_ns = config.interval_ns
        self._settle_ns = int(config.settle * NS)
        self._max_delay_ns = int(config.max_delay * NS)
        self._max_gap_ns = int(config.max_gap * NS)
        self._skew_ns = int(config.max_clock_skew * NS)
        self._excluded = {d.isoformat() for d in config.exclude_dates}
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._accounts = programme.accounts
        self._account_of = {meter: acc for acc in self._accounts for meter in acc.meters}
        self._meter_ids = {meter: pseudonyms.meter(meter) for acc in self._accounts for meter in acc.meters}
        self._load_state()

    # -- opening ----------------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        site: Site,
        data_dir: Path,
        *,
        new_epoch_reason: str | None = None,
        key_files: tuple[Path, Path] | None = None,
    ) -> IncentiveStage:
        """Open (or create) the ledger in ``data_dir``.

        ConfigError for bad config or keys, :class:`ProgrammeChanged` when the money settings differ from the
        epoch in force (unless ``new_epoch_reason`` starts a new epoch), StoreError for the file. ``key_files``
        (signing, pseudonym) replace the site's key files (``incentives test`` signs with throw-away keys).
        """
        config = site.config.incentives
        if config is None:
            raise ConfigError([site.diagnostic((), "the site file has no incentives: section")])
        problems = validate_against(site)
        if problems:
            raise ConfigError(problems)
        ledger = Ledger.open(Path(data_dir), durable=site.config.storage.durability == "power")
        try:
            signing_key, pseudonyms = _load_keys(site, config, Path(data_dir), ledger, key_files)
            zone_name = config.timezone or site.config.gateway.timezone
            programme = build_programme(config, site.registry, pseudonyms, zone_name)
            epoch = settle_epoch(site, ledger, programme, new_epoch_reason)
        except ConfigError:
            ledger.close()
            raise
        stage = cls(
            config=config,
            programme=programme,
            epoch=epoch,
            gateway_id=site.config.gateway.id,
            site_id=site.config.gateway.site,
            zone=ZoneInfo(zone_name),
            ledger=ledger,
            signing_key=signing_key,
            pseudonyms=pseudonyms,
        )
        if ledger.latest_epoch() is None:
            # the programme is bound to the ledger from its first open; the record reaches the caller on the first
            # call (or, after a crash before that, with the replay)
            now_ns = time_module.time_ns()
            stage._issue_epoch("genesis", now_ns)
            stage._pending.append(stage._checkpoint_event(stage._make_checkpoint(now_ns)))
        elif new_epoch_reason is not None:
            stage._epoch_reason = new_epoch_reason
        return stage

    def _load_state(self) -> None:
        ledger = self._ledger
        stored = ledger.cursors()
        self._cursor: dict[str, int | None] = {a.real_id: stored.get(a.real_id) for a in self._accounts}
        self._issued_any = ledger.issued_accounts()
        self._anchors: dict[str, Anchor] = {
            point: anchor for point, anchor in ledger.anchors().items() if point in self._account_of
        }
        self._latest: dict[str, Reading] = ledger.latest_readings()
        self._marks: dict[str, list[tuple[int, int]]] = {}
        for point, low, high in ledger.clock_marks():
            self._marks.setdefault(point, []).append((low, high))
        head = ledger.head()
        self._seq: int = head[0] if head else 0
        self._head_hash: str = head[1] if head else GENESIS_HASH
        #: the epoch record still to issue (genesis, or an operator's new epoch), with its reason
        self._epoch_reason: str | None = None
        self._last_now = 0
        #: account -> start of the interval last found not ready; recomputed only when new readings arrive
        self._not_ready: dict[str, int] = {}
        #: issued (committed) but not yet handed to the caller: survives an exception mid-call
        self._pending: list[Event] = []
        self._replay: list[Event] = []
        if head:
            self._replay = [
                self._event(orjson.loads(body), issued_ns)
                for body, issued_ns in ledger.bodies_since(head[2] - REPLAY_WINDOW_NS)
            ]
            checkpoint = ledger.meta("checkpoint")
            if checkpoint is not None:
                self._replay.append(self._checkpoint_event(orjson.loads(checkpoint)))

    # -- the stage --------------------------------------------------------------------------------------------

    def process(self, batch: Sequence[Sample], now_ns: int) -> list[Event]:
        """Store the meter readings in ``batch``; return the records of intervals that closed by ``now_ns``.

        A refused reading is counted in :attr:`counters` and never touches any other reading or account.
        """
        rows: list[tuple[str, int, int]] = []
        for sample in batch:
            if sample.point not in self._account_of:
                continue
            if sample.quality != Quality.GOOD:
                self.counters["not_good"] += 1
                continue
            micro = to_micro_kwh(sample.value)
            if micro is None:
                self.counters["invalid"] += 1  # NaN, infinite, negative, > 1 TWh or not a number
                continue
            if sample.ts > now_ns + self._skew_ns:
                self.counters["future"] += 1
                continue
            rows.append((sample.point, sample.ts, micro))
        with self._lock:
            self._watch_clock(now_ns)
            if rows:
                self._store_readings(rows)
            return self._hand_out(now_ns)

    def tick(self, now_ns: int) -> list[Event]:
        """Close intervals on time even when no reading arrives (a dead meter still gets its record)."""
        with self._lock:
            self._watch_clock(now_ns)
            return self._hand_out(now_ns)

    def records_of_day(self, day: date | str) -> list[dict[str, Any]]:
        """Records whose interval (or settled day) starts on ``day`` (local to the incentives zone), in issue order."""
        if isinstance(day, str):
            day = date.fromisoformat(day)
        first = int(datetime.combine(day, time(), tzinfo=self.zone).timestamp()) * NS
        after = int(datetime.combine(day + timedelta(days=1), time(), tzinfo=self.zone).timestamp()) * NS
        with self._lock:
            return [orjson.loads(body) for body in self._ledger.bodies_between(first, after)]

    def start_epoch(self, now_ns: int) -> list[Event]:
        """Issue the pending epoch record (``open(..., new_epoch_reason=...)``) without closing any interval."""
        with self._lock:
            self._watch_clock(now_ns)
            if self._epoch_reason is not None:
                self._issue_epoch(self._epoch_reason, now_ns)
                self._pending.append(self._checkpoint_event(self._make_checkpoint(now_ns)))
            events, self._pending = self._pending, []
            return events

    def close(self) -> None:
        with self._lock:
            self._ledger.close()

    @property
    def epoch(self) -> int:
        return self._epoch.number

    @property
    def accounts(self) -> tuple[AccountPlan, ...]:
        return self._accounts

    # -- time and readings ------------------------------------------------------------------------------------

    def _watch_clock(self, now_ns: int) -> None:
        """The gateway's clock stepping back: every interval it touches is flagged ``clock``."""
        last = self._last_now
        if last and now_ns < last - CLOCK_STEP_NS:
            self.counters["clock_steps"] += 1
            log.warning(
                "the gateway clock stepped back by %.0f s: incentive intervals around it are flagged",
                (last - now_ns) / NS,
            )
            span = (now_ns, last + (last - now_ns))
            marks = [(point, *span) for point in self._account_of]
            self._ledger.store_readings([], {}, marks)
            for point in self._account_of:
                self._marks.setdefault(point, []).append(span)
            self._last_now = now_ns  # one step, counted once: from here on this is the clock
            return
        self._last_now = max(last, now_ns)

    def _store_readings(self, rows: list[tuple[str, int, int]]) -> None:
        grid = self._interval_ns
        moved: dict[str, int] = {}
        marks: list[tuple[str, int, int]] = []
        kept: list[tuple[str, int, int]] = []
        for point, ts_ns, micro in rows:
            account = self._account_of[point]
            latest = self._latest.get(point)
            rules = account.rules[point]
            if (
                latest is not None
                and ts_ns < latest.ts_ns
                and counted_beyond(micro, latest.micro_kwh, rules) > rules.resolution_micro
            ):
                # stamped earlier than a reading already stored, yet counted further (across a wrap too): the clock
                # that stamped one of them was wrong; everything from here until the step is caught up cannot be
                # trusted
                span = (ts_ns, latest.ts_ns + (latest.ts_ns - ts_ns))
                marks.append((point, *span))
                self._marks.setdefault(point, []).append(span)
            anchor = self._anchors.get(point)
            if anchor is not None and ts_ns <= anchor.edge_ns:
                self.counters["late_dropped"] += 1  # before a closed edge: its interval is already issued
                continue
            kept.append((point, ts_ns, micro))
            if latest is None or ts_ns > latest.ts_ns:
                self._latest[point] = Reading(ts_ns, micro)
            self._not_ready.pop(account.real_id, None)
            first_edge = -(-ts_ns // grid) * grid  # the first edge at or after the reading: it can interpolate it
            current = moved.get(account.real_id, self._cursor[account.real_id])
            # before the first record an earlier (backfilled) reading may still move the start back
            if current is None or (first_edge < current and account.real_id not in self._issued_any):
                moved[account.real_id] = first_edge
        if not kept and not marks:
            return
        stored = self._ledger.store_readings(kept, moved, marks)
        self.counters["duplicates"] += len(kept) - stored
        self._cursor.update(moved)

    # -- closing intervals ------------------------------------------------------------------------------------

    def _hand_out(self, now_ns: int) -> list[Event]:
        self._pending.extend(self._take_replay())
        issued_before = self._seq
        if self._epoch_reason is not None:
            self._issue_epoch(self._epoch_reason, now_ns)
        self._close_due(now_ns)  # appends each record to _pending as soon as the ledger has committed it
        if self._seq != issued_before:
            self._pending.append(self._checkpoint_event(self._make_checkpoint(now_ns)))
        events, self._pending = self._pending, []
        return events

    def _close_due(self, now_ns: int) -> None:
        interval = self._interval_ns
        issued = 0
        waiting: set[str] = set()
        while issued < MAX_RECORDS_PER_CALL:
            due = [
                (start, index, account)
                for index, account in enumerate(self._accounts)
                if (start := self._cursor[account.real_id]) is not None
                and now_ns >= start + interval + self._settle_ns
                and account.real_id not in waiting
            ]
            if not due:
                return
            start, _, account = min(due, key=lambda item: (item[0], item[1]))
            end = start + interval
            overdue = now_ns >= end + self._max_delay_ns
            if not overdue and self._not_ready.get(account.real_id) == start:
                waiting.add(account.real_id)  # nothing new since it was last found not ready
                continue
            meters = {point: self._meter_interval(account, point, start, end) for point in account.meters}
            ready = all(m is not None and m.readings[-1].ts_ns >= end and not m.needs_more for m in meters.values())
            if not ready and not overdue:
                self._not_ready[account.real_id] = start
                waiting.add(account.real_id)
                continue
            issued += self._issue(account, start, end, meters, now_ns)

    def _meter_interval(self, account: AccountPlan, point: str, start: int, end: int) -> MeterInterval | None:
        rules = account.rules[point]
        anchor = self._anchors.get(point)
        first: Reading | None = None  # set for the meter's first interval: its anchor is made from ``later`` below
        if anchor is None:
            first = self._ledger.last_reading_at_or_before(point, start) or self._ledger.first_reading_after(
                point, start - 1
            )
            if first is None:
                return None  # the meter has never sent a reading
            anchor = Anchor(start, first, 0)
        # first the readings through the end and three beyond (enough to judge an outlier at the end); only when
        # the meter's last readings are equal across the end, through one more interval, to see whether that run
        # outlasts an interval (a frozen register) or ends in a rise. ``more_exist``: the meter has sent more.
        result = None
        for horizon in (end, end + self._interval_ns):
            later = self._ledger.readings_after(point, anchor.reading.ts_ns, horizon, _EXTRA_READINGS + 1)
            more_exist = sum(r.ts_ns >= horizon for r in later) > _EXTRA_READINGS
            if more_exist:
                later.pop()  # fetched only to learn that the meter has sent more than is needed
            if first is not None:
                anchor = first_anchor(start, first, later, rules)
            result = meter_interval(
                anchor, later, start, end, rules=rules, max_gap_ns=self._max_gap_ns, more_exist=more_exist
            )
            if not (result.open_run and more_exist):
                break
        assert result is not None
        return result

    def _clock_flagged(self, point: str, first_ts: int, last_ts: int) -> bool:
        """A clock mark touches the readings the interval used, its edge pairs included: the reading that ends
        the last pair may itself be one a stepped clock stamped (found by the fault property test, seed 28)."""
        return any(low <= last_ts and high >= first_ts for low, high in self._marks.get(point, ()))

    def _issue(
        self, account: AccountPlan, start: int, end: int, meters: dict[str, MeterInterval | None], now_ns: int
    ) -> int:
        """Issue the interval record (and the day's settlement when this interval ends the day); records issued.

        Three steps: decide the figures (``_judge``), write them as the record's body (``_interval_body``), then
        seal, commit and move on (``_commit``, ``_closed``)."""
        figures = self._judge(account, start, end, meters)
        local_day = local_start(start, self.zone).date()
        records = [
            self._seal(
                self._interval_body(account, start, end, figures),
                account=account,
                start_ns=start,
                local_day=local_day.isoformat(),
                flagged=bool(figures.flags),
                micro_kwh=figures.energy,
                delta_micro=figures.delta,
            )
        ]
        next_day = local_start(end, self.zone).date()
        if self.config.netting == "day" and next_day != local_day:
            records.append(self._settlement(account, local_day, records[0]))
        self._commit(records, now_ns, cursors={account.real_id: end}, anchors=figures.anchors)
        self._closed(account, end, figures.anchors)
        return len(records)

    def _judge(
        self, account: AccountPlan, start: int, end: int, meters: dict[str, MeterInterval | None]
    ) -> _IntervalFigures:
        """The decision: each meter's entry and flags, the baseline, the status, and what the interval pays."""
        baseline = compute_baseline(
            account.baseline,
            start,
            self._interval_ns,
            self.zone,
            lambda starts: self._ledger.history(account.real_id, int(self.config.interval), starts),
            skip_day=self._day_skipper(account.real_id),
        )
        entries: list[dict[str, Any]] = []
        record_flags: set[str] = set()
        notes: set[str] = set()
        energy = 0
        anchors: dict[str, Anchor] = {}
        for point, measured in meters.items():
            entry, flags, micro = self._meter_entry(
                account=account, point=point, start=start, end=end, measured=measured, baseline=baseline
            )
            entries.append(entry)
            record_flags |= flags
            energy += micro
            if measured is not None:
                notes |= measured.notes
                anchors[point] = measured.next_anchor
        if GAP in record_flags:
            status = "incomplete"
        elif record_flags:
            status = "flagged"
        elif baseline is None:
            status = "no_baseline"
        else:
            status = "measured"
        delta = baseline.micro_kwh - energy if status == "measured" and baseline is not None else 0
        return _IntervalFigures(
            entries=entries,
            flags=record_flags,
            notes=notes,
            anchors=anchors,
            baseline=baseline,
            status=status,
            energy=energy,
            delta=delta,
            saving=max(0, delta) if self.config.netting == "interval" else 0,
            factor=self.config.emission_factor.at(clock_time(start, self.zone)),
        )

    def _interval_body(self, account: AccountPlan, start: int, end: int, figures: _IntervalFigures) -> dict[str, Any]:
        """The record's body (schema 2, before its signature): the figures as text, in the units the schema names."""
        factor = figures.factor
        return {
            **self._common("interval", record_id(self.gateway_id, account.pseudonym, start)),
            "account": account.pseudonym,
            "interval": {
                "start": iso_ns(start),
                "end": iso_ns(end),
                "local_start": local_start(start, self.zone).isoformat(),
            },
            "status": figures.status,
            "flags": sorted(figures.flags),
            "notes": sorted(figures.notes),
            "meters": figures.entries,
            "energy_kwh": format_micro(figures.energy),
            "baseline": _baseline_body(figures.baseline),
            "delta_kwh": format_micro(figures.delta),
            "saving_kwh": format_micro(figures.saving),
            "emission_factor_kg_per_kwh": str(factor),
            "co2e_kg": format_micro(_times(figures.energy, factor)),
            "co2e_delta_kg": format_micro(_times(figures.delta, factor)),
            "co2e_saved_kg": format_micro(_times(figures.saving, factor)),
        }

    def _closed(self, account: AccountPlan, end: int, anchors: dict[str, Anchor]) -> None:
        """The interval is committed: move the account's in-memory state past it, as the ledger now has it."""
        self._cursor[account.real_id] = end
        self._issued_any.add(account.real_id)
        self._anchors.update(anchors)
        for point in anchors:  # marks that end before the closed edge can touch no open interval (the ledger agrees)
            if point in self._marks:
                self._marks[point] = [(low, high) for low, high in self._marks[point] if high >= end]
        self._not_ready.pop(account.real_id, None)

    def _meter_entry(
        self,
        *,
        account: AccountPlan,
        point: str,
        start: int,
        end: int,
        measured: MeterInterval | None,
        baseline: BaselineValue | None,
    ) -> tuple[dict[str, Any], set[str], int]:
        if measured is None:
            entry: dict[str, Any] = {
                "meter": self._meter_ids[point],
                "readings": [],
                "allocated_kwh": format_micro(0),
                "outliers": [],
                "kwh": format_micro(0),
                "flags": [GAP],
                "notes": [],
            }
            return entry, {GAP}, 0
        flags = set(measured.flags)
        if self._clock_flagged(point, min(start, measured.readings[0].ts_ns), max(end, measured.readings[-1].ts_ns)):
            flags.add(CLOCK)
        expected = baseline.micro_kwh if baseline is not None else 0
        # a meter that did not move while the baseline expects energy: frozen, never a saving. An interval closed
        # overdue while its last readings were still equal (the run undecided: the meter's data lag the clock) counts
        # as frozen too, since a record cannot be taken back once the run turns out longer than an interval.
        if expected > 0 and GAP not in flags and (measured.micro_kwh == 0 or measured.frozen or measured.open_run):
            flags.add(STUCK)
        if baseline is not None:
            step = resolution_step(measured.readings, account.rules[point])
            if Decimal(step) > Decimal(expected) * self.config.resolution_share:
                flags.add(RESOLUTION)
        entry = {
            "meter": self._meter_ids[point],
            "readings": [_reading(r) for r in measured.readings],
            "allocated_kwh": format_micro(measured.allocated),
            "outliers": [_reading(r) for r in measured.outliers],
            "kwh": format_micro(measured.micro_kwh),
            "flags": sorted(flags),
            "notes": sorted(measured.notes),
        }
        return entry, flags, measured.micro_kwh

    def _day_skipper(self, account: str) -> Callable[[date], bool]:
        abnormal = self._ledger.abnormal_days(account) | self._excluded

        def skip(day: date) -> bool:
            return day.isoformat() in abnormal

        return skip

    def _settlement(self, account: AccountPlan, day: date, closing: StoredRecord) -> StoredRecord:
        rows = [
            (rid, seq, orjson.loads(body))
            for rid, seq, body in self._ledger.day_intervals(account.real_id, account.pseudonym, day.isoformat())
        ]
        rows.append((closing.id, closing.seq, orjson.loads(closing.body)))
        listed = [
            {"id": rid, "seq": seq, "delta_kwh": body["delta_kwh"], "co2e_delta_kg": body["co2e_delta_kg"]}
            for rid, seq, body in rows
        ]
        net = sum(_micro_text(item["delta_kwh"]) for item in listed)
        co2e_net = sum(_micro_text(item["co2e_delta_kg"]) for item in listed)
        saving = max(0, net)
        midnight = int(datetime.combine(day, time(), tzinfo=self.zone).timestamp()) * NS
        body: dict[str, Any] = {
            **self._common(
                "settlement",
                settlement_id(self.gateway_id, account.pseudonym, day.isoformat()),
                seq=closing.seq + 1,
                prev_hash=closing.hash,
            ),
            "account": account.pseudonym,
            "day": day.isoformat(),
            "intervals": listed,
            "net_kwh": format_micro(net),
            "saving_kwh": format_micro(saving),
            "co2e_saved_kg": format_micro(max(0, co2e_net) if saving > 0 else 0),
        }
        return self._seal(
            body,
            account=account,
            start_ns=midnight,
            local_day=day.isoformat(),
            flagged=False,
            micro_kwh=0,
            delta_micro=net,
        )

    # -- records, epochs, checkpoints -------------------------------------------------------------------------

    def _common(self, kind: str, rid: str, *, seq: int | None = None, prev_hash: str | None = None) -> dict[str, Any]:
        return {
            "schema": SCHEMA_ID,
            "kind": kind,
            "id": rid,
            "seq": self._seq + 1 if seq is None else seq,
            "prev_hash": self._head_hash if prev_hash is None else prev_hash,
            "gateway": self.gateway_id,
            "site": self.site_id,
            "epoch": self._epoch.number,
            "programme": self._epoch.programme.hash,
            "key_id": self._key_id,
        }

    def _seal(
        self,
        body: dict[str, Any],
        *,
        account: AccountPlan | None,
        start_ns: int,
        local_day: str,
        flagged: bool,
        micro_kwh: int,
        delta_micro: int,
    ) -> StoredRecord:
        body["signature"] = sign(body, self._signing_key)
        return StoredRecord(
            seq=body["seq"],
            id=body["id"],
            kind=body["kind"],
            account=account.real_id if account is not None else "",
            pseudonym=account.pseudonym if account is not None else "",
            start_ns=start_ns,
            local_day=local_day,
            interval_s=int(self.config.interval),
            epoch=self._epoch.number,
            flagged=flagged,
            micro_kwh=micro_kwh,
            delta_micro=delta_micro,
            hash=record_hash(body),
            body=orjson.dumps(body, option=orjson.OPT_SORT_KEYS),
        )

    def _commit(
        self,
        records: list[StoredRecord],
        now_ns: int,
        *,
        cursors: dict[str, int],
        anchors: dict[str, Anchor] | None = None,
        epoch: tuple[int, str, bytes] | None = None,
    ) -> None:
        """The one write of an issue (blocking, on the caller's thread: see the ledger's docstring); the chain head
        and the records handed out move only once it is committed."""
        self._ledger.commit_issue(IssueCommit(tuple(records), now_ns, cursors, anchors or {}, epoch))
        self._seq, self._head_hash = records[-1].seq, records[-1].hash
        self._pending.extend(self._event(orjson.loads(r.body), now_ns) for r in records)

    def _issue_epoch(self, reason: str, now_ns: int) -> None:
        """The genesis record (epoch 1) or a new epoch's record; moves every cursor onto the programme's grid."""
        number = self._epoch.number
        programme = self._epoch.programme
        previous = self._ledger.latest_epoch()
        body: dict[str, Any] = {
            **self._common("epoch", epoch_id(self.gateway_id, number)),
            "programme_body": programme.body,
            "previous_programme": previous[1] if previous is not None else None,
            "reason": reason,
        }
        grid = self._interval_ns
        realigned = {account: -(-start // grid) * grid for account, start in self._cursor.items() if start is not None}
        record = self._seal(
            body, account=None, start_ns=number, local_day="", flagged=False, micro_kwh=0, delta_micro=0
        )
        self._commit(
            [record],
            now_ns,
            cursors=realigned,
            epoch=(number, programme.hash, orjson.dumps(programme.body, option=orjson.OPT_SORT_KEYS)),
        )
        self._cursor.update(realigned)
        self._epoch_reason = None
        log.info("incentive epoch %d started (%s), programme %s", number, reason, programme.hash[:12])

    def _make_checkpoint(self, now_ns: int) -> dict[str, Any]:
        checkpoint = make_checkpoint(
            gateway=self.gateway_id,
            site=self.site_id,
            epoch=self._epoch.number,
            seq=self._seq,
            head_hash=self._head_hash,
            ts_ns=now_ns,
            private_key=self._signing_key,
        )
        self._ledger.set_meta("checkpoint", orjson.dumps(checkpoint, option=orjson.OPT_SORT_KEYS).decode())
        return checkpoint

    def _checkpoint_event(self, checkpoint: dict[str, Any]) -> Event:
        seconds = datetime.strptime(checkpoint["ts"][:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
        return Event(
            id=f"chk_{self.gateway_id}_{checkpoint['seq']}",
            type="incentive_checkpoint",
            subject="checkpoint",
            ts=int(seconds) * NS,
            body=checkpoint,
        )

    def _event(self, record: dict[str, Any], issued_ns: int) -> Event:
        """A record as an outbox event, stamped with the end of its interval (or when it was issued)."""
        ts = issued_ns - issued_ns % NS
        if record["kind"] == "interval":
            end = datetime.strptime(record["interval"]["end"][:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
            ts = int(end.timestamp()) * NS
        return Event(id=record["id"], type="incentive", subject=record.get("account", "epoch"), ts=ts, body=record)

    def _take_replay(self) -> list[Event]:
        replay, self._replay = self._replay, []
        if replay:
            log.info("re-emitting %d incentive record(s) issued just before the last stop", len(replay))
        return replay


def _micro_text(text: str) -> int:
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("-").partition(".")
    return sign * (int(whole) * 1_000_000 + int(frac.ljust(6, "0")))


def _baseline_body(baseline: BaselineValue | None) -> dict[str, Any] | None:
    if baseline is None:
        return None
    body: dict[str, Any] = {"method": baseline.method, "kwh": format_micro(baseline.micro_kwh)}
    if baseline.method == "like_days":
        body["days"] = [{"start": iso_ns(start), "kwh": format_micro(micro)} for start, micro in baseline.days]
    return body


# -- epochs -----------------------------------------------------------------------------------------------------------


def settle_epoch(site: Site, ledger: Ledger, programme: Programme, new_epoch_reason: str | None) -> int:
    """The epoch this stage issues under: 1 for a new ledger, the stored one when the programme is unchanged, the
    next one when an operator asked for it; else :class:`ProgrammeChanged`."""
    latest = ledger.latest_epoch()
    if latest is None:
        return 1
    number, stored_hash, stored_body = latest
    if stored_hash == programme.hash:
        if new_epoch_reason is not None:
            raise ProgrammeChanged(
                [site.diagnostic(("incentives",), f"the programme is unchanged since epoch {number}: no new epoch")]
            )
        return number
    if new_epoch_reason is not None:
        return number + 1
    changed = describe_change(orjson.loads(stored_body), programme.body)
    raise ProgrammeChanged(
        [
            site.diagnostic(
                ("incentives",),
                f"the incentive programme differs from epoch {number} in the ledger ({changed}); records already "
                "issued were computed under the old one. Start a new epoch on purpose with: edge-gateway incentives "
                "new-epoch SITE.yaml --data-dir DIR --reason TEXT (or restore the old settings)",
            )
        ]
    )


# -- keys -------------------------------------------------------------------------------------------------------------


def _resolve(data_dir: Path, path: Path) -> Path:
    return path if path.is_absolute() else data_dir / path


def _load_keys(
    site: Site, config: IncentivesConfig, data_dir: Path, ledger: Ledger, key_files: tuple[Path, Path] | None
) -> tuple[Ed25519PrivateKey, Pseudonymizer]:
    if key_files is not None:
        signing_path, pseudonym_path = key_files
    else:
        signing_path = _resolve(data_dir, config.signing_key_file)
        pseudonym_path = _resolve(data_dir, config.pseudonym_key_file)
    missing = [p for p in (signing_path, pseudonym_path) if not p.exists()]
    if missing and config.generate_missing_keys:
        if ledger.has_records():
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
