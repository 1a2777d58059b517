"""Verification of an incentive record stream (record schema 2), as the city platform or an auditor runs it.

Owns the checks and their wording. ``docs/incentives.md`` is the specification and this module implements every
rule on that page: signatures and key ids, the hash chain from the genesis record, ``seq`` without gaps, ids and
``(account, interval)`` unique and never overlapping, the programme epochs, every figure re-derived from the
record's own readings and the programme in force (energy with interpolated edges, derivable flags, outliers, status,
like-days baselines against the stream, delta, saving, CO2e), settlements, and the chain-head checkpoint.

Imports only ``record`` (canonical encoding, hashes, ids, signatures): never the producer (``energy``, ``baseline``,
``stage``, ``config``). The producer and this verifier are two implementations of one page; tests check that every
record the producer issues verifies here, so each catches the other's misreading of the specification.

Input is JSON Lines, read once, in order: each line a record, or an outbox/MQTT event envelope whose ``body`` is the
record. Work per record is constant (dicts keyed by id, seq, account and day); a few passes at the end run over
small per-record summaries, so 100,000 records verify in seconds.

Wording: a problem of one record reads ``line N (seq S, ID): ...``; a problem of the stream as a whole has no
prefix. Figures are compared step by step against what the record itself states one step earlier (readings ->
meter kWh -> energy -> delta -> saving -> CO2e), so one fault gives one line, not a cascade.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterable, KeysView
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal
from fractions import Fraction
from functools import lru_cache
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.incentives.record import (
    GENESIS_HASH,
    SCHEMA_ID,
    checkpoint_problems,
    epoch_id,
    key_id,
    programme_hash,
    record_id,
    settlement_id,
    signature_is_canonical,
    signature_valid,
)

NS = 1_000_000_000
_MICRO = 1_000_000
#: watts times nanoseconds per µkWh
_W_NS_PER_MICRO_KWH = 3_600_000_000
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_KINDS = ("epoch", "interval", "settlement")
_FLAGS = frozenset({"gap", "spike", "reset", "replacement", "stuck", "resolution", "clock"})
_DECLARED_FLAGS = frozenset({"clock"})
_NOTES = frozenset({"rollover"})
_BAD_PAIR = frozenset({"reset", "spike"})
_STATUSES = frozenset({"measured", "incomplete", "flagged", "no_baseline"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_UTC_TS = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?Z")
_LOCAL_TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?[+-]\d{2}:\d{2}")
_FIGURE = re.compile(r"(-?)(0|[1-9]\d*)\.(\d{6})")
_FACTOR = re.compile(r"(0|[1-9]\d*)(\.\d+)?")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_CLOCK = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")
_WIDE = Context(prec=120)
#: the programme numbers that drive loops, bounded as the gateway's config bounds them (``config.py``, which this
#: module must not import): a signed ``lookback_days`` of billions once made verify walk back billions of days
_DAY_S = 86_400
_INTERVAL_S_RANGE = (60, _DAY_S)
_LIKE_DAYS_RANGE = (1, 60)
_LOOKBACK_DAYS_RANGE = (1, 366)

_COMMON: dict[str, type] = {
    "schema": str,
    "kind": str,
    "id": str,
    "seq": int,
    "prev_hash": str,
    "gateway": str,
    "site": str,
    "epoch": int,
    "programme": str,
    "key_id": str,
    "signature": str,
}
_KIND_MEMBERS: dict[str, frozenset[str]] = {
    "epoch": frozenset({"programme_body", "previous_programme", "reason"}),
    "interval": frozenset(
        {
            "account",
            "interval",
            "status",
            "flags",
            "notes",
            "meters",
            "energy_kwh",
            "baseline",
            "delta_kwh",
            "saving_kwh",
            "emission_factor_kg_per_kwh",
            "co2e_kg",
            "co2e_delta_kg",
            "co2e_saved_kg",
        }
    ),
    "settlement": frozenset({"account", "day", "intervals", "net_kwh", "saving_kwh", "co2e_saved_kg"}),
}
_PROGRAMME_MEMBERS = frozenset(
    {
        "interval_s",
        "max_gap_s",
        "settle_s",
        "max_delay_s",
        "max_clock_skew_s",
        "netting",
        "timezone",
        "resolution_share",
        "exclude_dates",
        "emission_factor",
        "pseudonym_key",
        "accounts",
    }
)


class _Bad(Exception):
    """The record (or programme) is not shaped as the specification says; the message names what."""


# -- parsing of the small things: times, figures, members --------------------------------------------------------


@lru_cache(maxsize=1 << 16)
def _utc_ns_or_none(text: str) -> int | None:
    match = _UTC_TS.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction = match.groups()
    try:
        ordinal = date(int(year), int(month), int(day)).toordinal()
    except ValueError:
        return None
    if int(hour) > 23 or int(minute) > 59 or int(second) > 59:
        return None
    seconds = (ordinal - _EPOCH_ORDINAL) * _DAY_S + int(hour) * 3600 + int(minute) * 60 + int(second)
    return seconds * NS + (int(fraction.ljust(9, "0")) if fraction else 0)


def _utc_ns(value: Any, what: str) -> int:
    ns = _utc_ns_or_none(value) if isinstance(value, str) else None
    if ns is None:
        raise _Bad(f"{what} is not a UTC time like 2026-12-01T00:15:00Z")
    return ns


def _show_ts(ns: int) -> str:
    seconds, rest = divmod(ns, NS)
    try:
        text = _iso(datetime(1970, 1, 1) + timedelta(seconds=seconds))
    except OverflowError:
        return f"{ns} ns"
    return f"{text}.{rest:09d}".rstrip("0") + "Z" if rest else text + "Z"


def _iso(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` (strftime does not pad years before 1000 everywhere)."""
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    )


@lru_cache(maxsize=1 << 16)
def _micro_or_none(text: str) -> int | None:
    match = _FIGURE.fullmatch(text)
    if match is None:
        return None
    sign, whole, fraction = match.groups()
    value = int(whole) * _MICRO + int(fraction)
    if sign and value == 0:
        return None  # "-0.000000" is not the one spelling of zero
    return -value if sign else value


def _micro(value: Any, what: str) -> int:
    micro = _micro_or_none(value) if isinstance(value, str) else None
    if micro is None:
        raise _Bad(f"{what} is not a decimal string with six places like '0.125000'")
    return micro


def _micro_or_null(value: Any, what: str) -> int | None:
    return None if value is None else _micro(value, what)


def _fmt(micro: int) -> str:
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), _MICRO)
    return f"{sign}{whole}.{fraction:06d}"


def _factor(value: Any, what: str) -> Decimal:
    if not isinstance(value, str) or _FACTOR.fullmatch(value) is None:
        raise _Bad(f"{what} is not a non-negative decimal string like '0.5703'")
    return Decimal(value)


def _div_half_even(numerator: int, denominator: int) -> int:
    quotient, remainder = divmod(numerator, denominator)  # floor; remainder >= 0 for denominator > 0
    if 2 * remainder > denominator or (2 * remainder == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def _times_factor(micro: int, factor: Decimal) -> int:
    """``micro`` µkWh times ``factor`` kg/kWh, in µkg rounded half-even (exactly, whatever the factor's places)."""
    return int(_WIDE.multiply(Decimal(micro), factor).quantize(Decimal(1), rounding=ROUND_HALF_EVEN, context=_WIDE))


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{what} is not an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Bad(f"{what} is not a list")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{what} is not a string")
    return value


def _int(value: Any, what: str, *, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _Bad(f"{what} is not an integer of at least {minimum}")
    return value


def _bounded(value: Any, what: str, bounds: tuple[int, int]) -> int:
    low, high = bounds
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _Bad(f"{what} is {value!r:.40}, not an integer in the allowed range {low}..{high}")
    return value


def _members(value: dict[str, Any], expected: frozenset[str] | set[str], what: str) -> None:
    if value.keys() == expected:
        return
    missing = sorted(expected - value.keys())
    if missing:
        raise _Bad(f"{what} has no member {missing[0]!r}")
    extra = sorted(value.keys() - expected)
    if extra:
        raise _Bad(f"{what} has an unexpected member {extra[0]!r}")


def _sorted_unique(values: list[Any], what: str, known: frozenset[str]) -> list[str]:
    for value in values:
        if not isinstance(value, str) or value not in known:
            raise _Bad(f"{what}: unknown entry {value!r}")
    if values != sorted(set(values)):
        raise _Bad(f"{what} is not sorted without duplicates")
    return values


def _day_ordinal(value: Any, what: str) -> int:
    if not isinstance(value, str) or _DAY.fullmatch(value) is None:
        raise _Bad(f"{what} is not a date like 2026-12-01")
    try:
        return date.fromisoformat(value).toordinal()
    except ValueError as exc:
        raise _Bad(f"{what} is not a date like 2026-12-01") from exc


def _show_day(ordinal: int) -> str:
    return date.fromordinal(ordinal).isoformat()


def _weekend(ordinal: int) -> bool:
    return (ordinal - 1) % 7 >= 5  # ordinal 1 (0001-01-01) is a Monday


@lru_cache(maxsize=1 << 16)
def _local(start_s: int, zone: ZoneInfo) -> tuple[int, int, int] | None:
    """Local date ordinal, seconds since local midnight (wall clock) and UTC offset in seconds of a UTC second;
    None at the calendar's edge (year 1 or 9999 with an offset that leaves it)."""
    try:
        moment = datetime.fromtimestamp(start_s, zone)
    except (OverflowError, ValueError, OSError):
        return None
    offset = moment.utcoffset()
    assert offset is not None
    return moment.toordinal(), moment.hour * 3600 + moment.minute * 60 + moment.second, int(offset.total_seconds())


@lru_cache(maxsize=1 << 10)
def _share_of(share: Fraction, baseline: int) -> Fraction:
    return share * _kwh_fraction(baseline)


def _show_clock(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# -- the programme ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Replacement:
    at: int
    old_final: int | None
    new_initial: int | None


@dataclass(frozen=True, slots=True)
class _MeterRules:
    meter: str
    limit_w: int
    wrap: int | None
    resolution: int
    replacements: tuple[_Replacement, ...]

    @property
    def resolution_kwh(self) -> Fraction:
        return _kwh_fraction(self.resolution)


@dataclass(frozen=True, slots=True)
class _BaselineRules:
    method: str
    kwh: int | None = None  # fixed
    days: int = 0  # like_days
    min_days: int = 0
    lookback_days: int = 0


@dataclass(frozen=True, slots=True)
class _AccountRules:
    account: str
    baseline: _BaselineRules
    meters: tuple[_MeterRules, ...]


@dataclass(frozen=True, slots=True)
class _Window:
    start: int  # seconds since local midnight, inclusive
    end: int  # exclusive; end < start wraps past midnight
    factor: Decimal

    def contains(self, seconds: int) -> bool:
        if self.start <= self.end:
            return self.start <= seconds < self.end
        return seconds >= self.start or seconds < self.end


@dataclass(frozen=True, slots=True)
class _Programme:
    interval_s: int
    max_gap_s: int
    netting: str
    zone: ZoneInfo
    resolution_share: Fraction
    exclude: frozenset[int]
    factor: Decimal
    windows: tuple[_Window, ...]
    accounts: dict[str, _AccountRules]

    def factor_at(self, seconds: int) -> Decimal:
        for window in self.windows:
            if window.contains(seconds):
                return window.factor
        return self.factor


def _clock(value: Any, what: str) -> int:
    match = _CLOCK.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise _Bad(f"{what} is not a local time like 23:00")
    return int(match.group(1)) * 3600 + int(match.group(2)) * 60


def _parse_programme(body: Any) -> _Programme:
    programme = _obj(body, "programme_body")
    _members(programme, _PROGRAMME_MEMBERS, "programme_body")
    interval_s = _bounded(programme["interval_s"], "interval_s", _INTERVAL_S_RANGE)
    if _DAY_S % interval_s:
        raise _Bad(f"interval_s {interval_s} does not divide a day (86400 s)")
    max_gap_s = _int(programme["max_gap_s"], "max_gap_s")
    for name in ("settle_s", "max_delay_s", "max_clock_skew_s"):
        _int(programme[name], name)
    netting = programme["netting"]
    if netting not in ("day", "interval"):
        raise _Bad("netting is neither 'day' nor 'interval'")
    try:
        zone = ZoneInfo(_str(programme["timezone"], "timezone"))
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise _Bad(f"timezone {programme['timezone']!r} is not a known IANA zone") from exc
    share = Fraction(_factor(programme["resolution_share"], "resolution_share"))
    exclude = frozenset(
        _day_ordinal(day, "exclude_dates entry") for day in _list(programme["exclude_dates"], "exclude_dates")
    )
    factor_body = _obj(programme["emission_factor"], "emission_factor")
    _members(factor_body, {"kg_per_kwh", "by_time_of_day"}, "emission_factor")
    windows = []
    for entry in _list(factor_body["by_time_of_day"], "by_time_of_day"):
        window = _obj(entry, "by_time_of_day entry")
        _members(window, {"from", "to", "kg_per_kwh"}, "by_time_of_day entry")
        windows.append(
            _Window(
                _clock(window["from"], "from"),
                _clock(window["to"], "to"),
                _factor(window["kg_per_kwh"], "by_time_of_day kg_per_kwh"),
            )
        )
    _str(programme["pseudonym_key"], "pseudonym_key")
    accounts: dict[str, _AccountRules] = {}
    names: list[str] = []
    for entry in _list(programme["accounts"], "accounts"):
        account = _parse_account(entry)
        names.append(account.account)
        accounts[account.account] = account
    if names != sorted(set(names)):
        raise _Bad("accounts are not sorted by account without duplicates")
    return _Programme(
        interval_s=interval_s,
        max_gap_s=max_gap_s,
        netting=netting,
        zone=zone,
        resolution_share=share,
        exclude=exclude,
        factor=_factor(factor_body["kg_per_kwh"], "emission_factor kg_per_kwh"),
        windows=tuple(windows),
        accounts=accounts,
    )


def _parse_account(entry: Any) -> _AccountRules:
    body = _obj(entry, "accounts entry")
    _members(body, {"account", "baseline", "meters"}, "accounts entry")
    account = _str(body["account"], "account")
    rules = _obj(body["baseline"], f"account {account}: baseline")
    if rules.get("method") == "fixed":
        _members(rules, {"method", "kwh"}, f"account {account}: baseline")
        baseline = _BaselineRules("fixed", kwh=_micro(rules["kwh"], f"account {account}: baseline kwh"))
    elif rules.get("method") == "like_days":
        _members(rules, {"method", "days", "min_days", "lookback_days"}, f"account {account}: baseline")
        days = _bounded(rules["days"], f"account {account}: baseline days", _LIKE_DAYS_RANGE)
        baseline = _BaselineRules(
            "like_days",
            days=days,
            min_days=_bounded(rules["min_days"], f"account {account}: baseline min_days", (1, days)),
            lookback_days=_bounded(
                rules["lookback_days"], f"account {account}: baseline lookback_days", _LOOKBACK_DAYS_RANGE
            ),
        )
    else:
        raise _Bad(f"account {account}: baseline method is neither 'fixed' nor 'like_days'")
    meters = []
    for item in _list(body["meters"], f"account {account}: meters"):
        meter = _obj(item, f"account {account}: meters entry")
        _members(meter, {"meter", "limit_w", "wrap_kwh", "resolution_kwh", "replacements"}, "meters entry")
        name = _str(meter["meter"], "meter")
        wrap = _micro_or_null(meter["wrap_kwh"], f"meter {name}: wrap_kwh")
        if wrap is not None and wrap <= 0:
            raise _Bad(f"meter {name}: wrap_kwh must be positive")
        swaps = []
        for swap_item in _list(meter["replacements"], f"meter {name}: replacements"):
            swap = _obj(swap_item, f"meter {name}: replacements entry")
            _members(swap, {"at", "old_final_kwh", "new_initial_kwh"}, f"meter {name}: replacements entry")
            swaps.append(
                _Replacement(
                    _utc_ns(swap["at"], f"meter {name}: replacement at"),
                    _micro_or_null(swap["old_final_kwh"], f"meter {name}: old_final_kwh"),
                    _micro_or_null(swap["new_initial_kwh"], f"meter {name}: new_initial_kwh"),
                )
            )
        resolution = _micro(meter["resolution_kwh"], f"meter {name}: resolution_kwh")
        if resolution < 0:
            raise _Bad(f"meter {name}: resolution_kwh is negative")
        meters.append(
            _MeterRules(name, _int(meter["limit_w"], f"meter {name}: limit_w"), wrap, resolution, tuple(swaps))
        )
    meter_names = [m.meter for m in meters]
    if not meter_names or meter_names != sorted(set(meter_names)):
        raise _Bad(f"account {account}: meters are empty or not sorted by meter without duplicates")
    return _AccountRules(account, baseline, tuple(meters))


# -- energy of one meter ---------------------------------------------------------------------------------------

Reading = tuple[int, int]  # (ts ns, µkWh)


def _advance(a: Reading, b: Reading, rules: _MeterRules) -> tuple[int, str | None, bool]:
    """``adv(a, b)``, the pair's flag (replacement, reset, spike or None) and whether it rolled over."""
    swaps = [swap for swap in rules.replacements if a[0] < swap.at <= b[0]]
    if swaps:
        swap = swaps[0]
        if len(swaps) == 1 and swap.old_final is not None and swap.new_initial is not None:
            before, after = swap.old_final - a[1], b[1] - swap.new_initial
            if before >= 0 and after >= 0:
                return before + after, "replacement", False
        return 0, "replacement", False
    delta = b[1] - a[1]
    limit = _limit(a, b, rules)
    if delta < 0:
        if rules.wrap is not None and 0 <= delta + rules.wrap <= limit:
            return delta + rules.wrap, None, True
        return 0, "reset", False
    if delta > limit:
        return delta, "spike", False
    return delta, None, False


def _limit(a: Reading, b: Reading, rules: _MeterRules) -> int:
    return rules.limit_w * (b[0] - a[0]) // _W_NS_PER_MICRO_KWH + rules.resolution


@lru_cache(maxsize=1 << 14)
@lru_cache(maxsize=1 << 10)
def _kwh_fraction(micro: int) -> Fraction:
    return Fraction(micro, _MICRO)


def _float32_step(micro: int) -> Fraction | None:
    """The float32 spacing at a reading exactly representable as float32 (distance to the next larger one)."""
    if micro % 15_625:
        return None  # micro / 10**6 is a binary fraction only when 5**6 divides micro
    value = Fraction(micro, _MICRO)
    try:
        as_float32 = struct.unpack("<f", struct.pack("<f", float(value)))[0]
    except (OverflowError, struct.error):
        return None
    if Fraction(as_float32) != value:
        return None
    if as_float32 == 0:
        return Fraction(1, 2**149)
    _, exponent = math.frexp(abs(as_float32))  # |v| = m * 2**exponent, 0.5 <= m < 1
    return Fraction(2) ** max(exponent - 24, -149)


@dataclass(slots=True)
class _MeterResult:
    kwh: int
    flags: dict[str, str]  # derived flag -> why
    rollover: bool
    problems: list[str]
    readings: list[Reading]


_READING_MEMBERS = frozenset({"ts", "kwh"})


def _readings(value: Any, what: str) -> list[Reading]:
    readings = []
    for item in _list(value, what):
        if type(item) is not dict or item.keys() != _READING_MEMBERS:
            _members(_obj(item, f"{what} entry"), _READING_MEMBERS, f"{what} entry")
        ts, kwh = item["ts"], item["kwh"]
        # both caches hold the parsed value: adjacent intervals share their edge readings
        ns = _utc_ns_or_none(ts) if type(ts) is str else None
        micro = _micro_or_none(kwh) if type(kwh) is str else None
        if ns is None or micro is None:
            ns, micro = _utc_ns(ts, f"{what} ts"), _micro(kwh, f"{what} kwh")
        readings.append((ns, micro))
    if any(a[0] >= b[0] for a, b in pairwise(readings)):
        raise _Bad(f"{what} are not in strictly increasing time order")
    return readings


def _meter_energy(meter: dict[str, Any], rules: _MeterRules, start: int, end: int, max_gap: int) -> _MeterResult:
    """Everything the spec derives from one meter's readings, outliers and ``allocated_kwh`` over ``[start, end)``."""
    name = rules.meter
    readings = _readings(meter["readings"], f"meter {name}: readings")
    outliers = _readings(meter["outliers"], f"meter {name}: outliers")
    allocated = _micro(meter["allocated_kwh"], f"meter {name}: allocated_kwh")
    flags: dict[str, str] = {}
    problems: list[str] = []
    rollover = False
    if allocated < 0:
        problems.append(f"meter {name}: allocated_kwh {_fmt(allocated)} is negative")
    if not readings:
        flags["gap"] = "no readings"
        return _MeterResult(-allocated, flags, rollover, problems, readings)
    if len(readings) >= 2 and readings[1][0] <= start:
        problems.append(f"meter {name}: readings start with more than one reading at or before the interval start")
    if any(ts >= end for ts, _ in readings[:-1]):
        problems.append(f"meter {name}: readings go on after the first reading at or after the interval end")

    pairs = [_advance(a, b, rules) for a, b in pairwise(readings)]
    energy = 0
    for (a, b), (adv, flag, rolled) in zip(pairwise(readings), pairs, strict=True):
        if a[0] >= end:
            break
        until = min(end, b[0])
        energy += adv if until == b[0] else adv * (until - a[0]) // (b[0] - a[0])
        if b[0] <= start:
            continue  # not overlapping the interval (only in a malformed list, reported above)
        rollover = rollover or rolled
        if flag is not None and flag not in flags:
            span = f"{_show_ts(a[0])}..{_show_ts(b[0])}"
            if flag == "spike":
                limit = _fmt(_limit(a, b, rules))
                flags["spike"] = f"the pair {span} advances {_fmt(adv)} kWh, above its limit {limit}"
            elif flag == "reset":
                flags["reset"] = f"the counter goes back from {_fmt(a[1])} to {_fmt(b[1])} in the pair {span}"
            else:
                flags["replacement"] = f"a declared replacement falls in the pair {span}"
        if b[0] - a[0] > max_gap and "gap" not in flags:
            flags["gap"] = f"the pair {_show_ts(a[0])}..{_show_ts(b[0])} spans more than max_gap_s"

    first = readings[0]
    if first[0] > start:
        flags.setdefault("gap", "no reading at or before the interval start")
        expected_allocation = 0
    elif len(pairs) >= 1:
        second = readings[1]
        expected_allocation = pairs[0][0] * (min(start, second[0]) - first[0]) // (second[0] - first[0])
    else:
        expected_allocation = 0
    if readings[-1][0] < end:
        flags.setdefault("gap", "no reading at or after the interval end")
    if allocated != expected_allocation:
        flags.setdefault(
            "gap", f"allocated_kwh {_fmt(allocated)} is not cum(c0, c1, start) = {_fmt(expected_allocation)}"
        )
    energy -= allocated

    if outliers:
        flags.setdefault("spike", "an outlier was removed")
    problems.extend(_outlier_problems(name, readings, outliers, pairs, rules))
    return _MeterResult(energy, flags, rollover, problems, readings)


def _outlier_problems(
    name: str,
    readings: list[Reading],
    outliers: list[Reading],
    pairs: list[tuple[int, str | None, bool]],
    rules: _MeterRules,
) -> list[str]:
    problems: list[str] = []
    times = [ts for ts, _ in readings]
    slots: Counter[int] = Counter()
    for outlier in outliers:
        at = bisect.bisect_left(times, outlier[0])
        where = f"meter {name}: outlier {_fmt(outlier[1])} at {_show_ts(outlier[0])}"
        if at < len(times) and times[at] == outlier[0]:
            problems.append(f"{where} has the time of a listed reading")
            continue
        if at in (0, len(times)):
            problems.append(f"{where} is not between two listed readings")
            continue
        slots[at] += 1
        before, after = readings[at - 1], readings[at]
        first, second, skip = (
            _advance(before, outlier, rules)[1],
            _advance(outlier, after, rules)[1],
            _advance(before, after, rules)[1],
        )
        if first not in _BAD_PAIR or second not in _BAD_PAIR or skip in _BAD_PAIR:
            problems.append(
                f"{where} is not an outlier: the pairs around it are {first or 'plausible'} and "
                f"{second or 'plausible'}, the pair without it is {skip or 'plausible'}"
            )
    problems.extend(
        f"meter {name}: {count} outliers between the listed readings at {_show_ts(times[at - 1])} and "
        f"{_show_ts(times[at])}: an outlier is a single reading"
        for at, count in sorted(slots.items())
        if count > 1
    )
    for index in range(1, len(readings) - 1):
        if (
            pairs[index - 1][1] in _BAD_PAIR
            and pairs[index][1] in _BAD_PAIR
            and _advance(readings[index - 1], readings[index + 1], rules)[1] not in _BAD_PAIR
        ):
            reading = readings[index]
            problems.append(
                f"meter {name}: the reading {_fmt(reading[1])} at {_show_ts(reading[0])} is an outlier "
                "but is listed in readings, not in outliers"
            )
    return problems


def _resolution_step(readings: list[Reading], rules: _MeterRules) -> Fraction:
    """``resolution_kwh``, or, when every listed reading is exactly a float32, the larger of that and the biggest
    float32 spacing at them (a register that is a float32 counts in its spacing)."""
    spacings = [_float32_step(micro) for _, micro in readings]
    if not spacings or any(spacing is None for spacing in spacings):
        return rules.resolution_kwh
    return max([rules.resolution_kwh, *(spacing for spacing in spacings if spacing is not None)])


def _frozen_run(readings: list[Reading], start: int, end: int, interval: int) -> tuple[Reading, Reading] | None:
    """The first span without advance longer than one interval that overlaps ``[start, end)``: from the first of a
    run of equal listed readings to the reading after the run (the one that rises), or to the run's last reading."""
    first = 0
    for index in range(1, len(readings) + 1):
        if index < len(readings) and readings[index][1] == readings[first][1]:
            continue
        low = readings[first]
        high = readings[index] if index < len(readings) else readings[index - 1]
        if high[0] - low[0] > interval and low[0] < end and high[0] > start:
            return low, high
        first = index
    return None


def _may_run_on(readings: list[Reading]) -> bool:
    """The listed readings begin or end with two equal ones: a frozen run may go on beyond them (declared)."""
    return len(readings) >= 2 and (readings[0][1] == readings[1][1] or readings[-1][1] == readings[-2][1])


# -- the report ------------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    records: int = 0
    problems: list[str] = field(default_factory=list)
    first_seq: int | None = None
    last_seq: int | None = None
    kinds: Counter[str] = field(default_factory=Counter)
    #: the checkpoint's seq when one was given and it matched the stream
    checkpoint_seq: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and self.records > 0

    def summary(self) -> str:
        kinds = ", ".join(f"{self.kinds[k]} {k}" for k in _KINDS if self.kinds[k])
        text = f"ok: {self.records} record(s) ({kinds}), seq {self.first_seq}..{self.last_seq}"
        text += ", signatures, chain and figures valid"
        if self.checkpoint_seq is not None:
            text += f"; checkpoint at seq {self.checkpoint_seq} matches"
        return text


@dataclass(slots=True)
class _Seen:
    line: int
    seq: int
    id: str
    hash: str
    prev_hash: str
    epoch: int
    trusted: bool  # signed by a given key with a valid signature


@dataclass(slots=True)
class _Interval:
    """What later records need to know about one trusted interval record."""

    line: int
    seq: int
    id: str
    account: str
    start: int
    end: int
    day: int | None  # local date ordinal under the programme in force
    clock: int | None  # local wall-clock seconds of the start
    energy: int | None
    delta: int | None
    co2e_delta: int | None
    flagged: bool

    def where(self) -> str:
        return f"line {self.line}, seq {self.seq}, {self.id}"


@dataclass(slots=True)
class _Settlement:
    where: str
    line: int
    seq: int
    id: str
    account: str
    day: int
    entries: list[tuple[str, int, int, int]]  # id, seq, delta µkWh, co2e delta µkg


@dataclass(slots=True)
class _PendingDay:
    where: str
    seq: int
    account: str
    start: int
    kwh: int


# -- the verifier ----------------------------------------------------------------------------------------------


class _Verifier:
    def __init__(self, public_keys: Iterable[Ed25519PublicKey], from_seq: int | None) -> None:
        self.public_keys = list(public_keys)
        self.keys = {key_id(k): k for k in self.public_keys}
        self.from_seq = from_seq
        self.report = VerifyReport()
        self.by_id: dict[str, _Seen] = {}
        self.by_seq: dict[int, _Seen] = {}
        self.foreign_keys: dict[str, list[int]] = {}
        self.max_seq: int | None = None
        self.started = False
        #: the stream holds the genesis record: everything a record refers to must be in it
        self.from_genesis = False
        #: no seq missing so far and every record so far trusted (baseline selections can be re-derived)
        self.whole = True
        self.gateway: str | None = None
        self.site: str | None = None
        # the epoch in force
        self.epoch: int | None = None
        self.programme_hash: str | None = None
        self.programme: _Programme | None = None
        self.epoch_trusted = False
        # indexes over trusted interval records
        self.intervals: dict[tuple[str, int], _Interval] = {}
        self.interval_ids: dict[str, _Interval] = {}
        self.slots: dict[tuple[str, int, int], _Interval] = {}
        self.days: dict[tuple[str, int], list[_Interval]] = {}
        self.abnormal: dict[tuple[str, int], int] = {}
        self.spans: dict[str, list[_Interval]] = {}
        self.settled: dict[tuple[str, int], _Settlement] = {}
        self.settlements: list[_Settlement] = []
        self.pending_days: list[_PendingDay] = []
        self.untrusted_ids: set[str] = set()

    def problem(self, text: str) -> None:
        self.report.problems.append(text)

    # -- one line ----------------------------------------------------------------------------------------------

    def feed(self, number: int, raw: bytes | str) -> None:
        """One line: decode it, check its identity and signature, place it in the chain, then check its content."""
        decoded = self._decode(number, raw)
        if decoded is None:
            return
        record, digest = decoded
        self.report.records += 1
        where = f"line {number} (seq {record['seq']}, {record['id']})"
        if not self._unique(record, where, digest):
            return
        self.report.kinds[record["kind"]] += 1
        trusted = self._trusted(record, where, number)
        seen = self._place(record, where, number, digest, trusted)
        self._content(record, where, seen, trusted)

    def _decode(self, number: int, raw: bytes | str) -> tuple[dict[str, Any], str] | None:
        """The line's record (unwrapped from an event envelope) and its hash, or None (reported) when it is not
        one JSON object of the common shape."""
        text = (raw if isinstance(raw, bytes) else raw.encode()).strip()
        if not text:
            return None
        try:
            item = orjson.loads(text)
        except orjson.JSONDecodeError:
            self.problem(f"line {number}: not valid JSON")
            return None
        record = _unwrap(item)
        canonical_line = record is item and isinstance(record, dict) and _canonical(record) == text
        if not canonical_line:
            # parsers disagree on which of two equal keys wins: a line that says two things is tampered with
            try:
                duplicate = _duplicate_key(text)
            except (ValueError, RecursionError):
                self.problem(f"line {number}: not valid JSON")
                return None
            if duplicate is not None:
                self.problem(f"line {number}: duplicate JSON key {duplicate!r}")
                return None
        shape = _common_shape(record)
        if shape is not None:
            self.problem(f"line {number}: {shape}")
            return None
        digest = _sha256(text) if canonical_line else _sha256(_canonical(record))
        return record, digest

    def _unique(self, record: dict[str, Any], where: str, digest: str) -> bool:
        """False (reported) for a second record with an id or a seq already seen."""
        seq, rid = record["seq"], record["id"]
        if rid in self.by_id:
            first = self.by_id[rid]
            if first.hash == digest:
                self.problem(f"{where}: replayed record, identical to line {first.line}")
            else:
                self.problem(f"{where}: a different record with the same id as line {first.line}")
            return False
        if seq in self.by_seq:
            self.problem(f"{where}: duplicate seq {seq}, already used on line {self.by_seq[seq].line}")
            return False
        return True

    def _trusted(self, record: dict[str, Any], where: str, number: int) -> bool:
        """Signed by one of the given keys, with a valid signature in canonical form."""
        key = self.keys.get(record["key_id"])
        if key is None:
            self.foreign_keys.setdefault(record["key_id"], []).append(number)
        elif not signature_valid(record, key):
            self.problem(f"{where}: bad signature: the record was changed after it was signed")
        elif not signature_is_canonical(record["signature"]):
            self.problem(f"{where}: the signature is not written as canonical base64url (its hash would vary)")
        else:
            return True
        return False

    def _place(self, record: dict[str, Any], where: str, number: int, digest: str, trusted: bool) -> _Seen:
        """Order, the indexes by id and seq, the stream's start, and its gateway and site."""
        seq, rid = record["seq"], record["id"]
        if self.max_seq is not None and seq < self.max_seq:
            self.problem(f"{where}: out of order, seq {seq} comes after seq {self.max_seq}")
        if self.max_seq is not None and seq != self.max_seq + 1:
            self.whole = False
        self.max_seq = seq if self.max_seq is None else max(self.max_seq, seq)
        seen = _Seen(number, seq, rid, digest, record["prev_hash"], record["epoch"], trusted)
        self.by_id[rid] = seen
        self.by_seq[seq] = seen
        if not trusted:
            self.whole = False
            self.untrusted_ids.add(rid)

        if not self.started:
            self.started = True
            self._first_record(record, where)
        if self.gateway is None:
            self.gateway, self.site = record["gateway"], record["site"]
        elif trusted and (record["gateway"], record["site"]) != (self.gateway, self.site):
            self.problem(
                f"{where}: gateway {record['gateway']!r} / site {record['site']!r} is not the stream's "
                f"({self.gateway!r} / {self.site!r})"
            )
        return seen

    def _content(self, record: dict[str, Any], where: str, seen: _Seen, trusted: bool) -> None:
        """Re-derive what a trusted record states, by its kind, under the epoch in force."""
        kind = record["kind"]
        if kind == "epoch":
            self._epoch(record, where, trusted)
            return
        if not trusted or self.epoch is None or not self.epoch_trusted:
            # untrusted content is not re-derived, nor is anything under an untrusted epoch record; a stream
            # without its epoch record is reported once
            return
        if (record["epoch"], record["programme"]) != (self.epoch, self.programme_hash):
            self.problem(
                f"{where}: epoch {record['epoch']} / programme {record['programme'][:12]}... is not the epoch in "
                f"force ({self.epoch} / {str(self.programme_hash)[:12]}...)"
            )
        if self.programme is None:
            return  # its epoch record is unusable (reported there)
        try:
            if kind == "interval":
                self._interval(record, where, seen, self.programme)
            else:
                self._settlement(record, where, seen, self.programme)
        except _Bad as exc:
            self.problem(f"{where}: malformed: {exc}")

    def _first_record(self, record: dict[str, Any], where: str) -> None:
        seq, kind = record["seq"], record["kind"]
        if self.from_seq is None:
            if kind == "epoch" and seq == 1:
                self.from_genesis = True
            elif seq == 1:
                self.problem(f"{where}: seq 1 is not the genesis record (kind epoch, epoch 1)")
                self.from_genesis = True
            else:
                self.problem(
                    f"the first records are missing: the stream starts at seq {seq} ({where}), not with the "
                    "genesis record at seq 1 (a partial export is verified with --from-seq)"
                )
                self.whole = False
            return
        self.from_genesis = seq == 1
        self.whole = self.from_genesis
        if kind != "epoch" or seq > self.from_seq:
            self.problem(
                f"the stream must start with the epoch record in force at seq {self.from_seq} (as `incentives "
                f"export --since {self.from_seq}` writes it), but starts with {where}, kind {kind}"
            )

    # -- epoch records -----------------------------------------------------------------------------------------

    def _epoch(self, record: dict[str, Any], where: str, trusted: bool) -> None:
        number, seq = record["epoch"], record["seq"]
        previous_hash = self.programme_hash
        previous_number = self.epoch
        # whatever is wrong with it, the records after it are under this epoch now
        self.epoch, self.programme_hash, self.programme = number, record["programme"], None
        self.epoch_trusted = trusted
        if not trusted:
            return
        try:
            _members(record, set(_COMMON) | _KIND_MEMBERS["epoch"], "the record")
            if previous_number is None:
                if seq == 1 and number != 1:
                    self.problem(f"{where}: the genesis record must open epoch 1, not epoch {number}")
            elif number != previous_number + 1:
                self.problem(f"{where}: epoch {number} does not follow epoch {previous_number}")
            if number == 1 and seq != 1:
                self.problem(f"{where}: epoch 1 is opened by the genesis record at seq 1 only")
            expected_id = epoch_id(record["gateway"], number)
            if record["id"] != expected_id:
                self.problem(f"{where}: id is not derived from gateway and epoch number ({expected_id})")
            body = _obj(record["programme_body"], "programme_body")
            actual = programme_hash(body)
            if record["programme"] != actual:
                self.problem(
                    f"{where}: programme {record['programme']} is not the hash of its programme_body ({actual})"
                )
            previous = record["previous_programme"]
            if number == 1 or previous_hash is None:
                if number == 1 and previous is not None:
                    self.problem(f"{where}: the genesis record's previous_programme must be null")
            elif previous != previous_hash:
                self.problem(f"{where}: previous_programme is not the programme of epoch {previous_number}")
            if previous is not None and (not isinstance(previous, str) or _HEX64.fullmatch(previous) is None):
                raise _Bad("previous_programme is neither null nor a SHA-256 hex digest")
            _str(record["reason"], "reason")
            self.programme = _parse_programme(body)
        except _Bad as exc:
            self.problem(f"{where}: malformed: {exc}")

    # -- interval records --------------------------------------------------------------------------------------

    def _interval(self, record: dict[str, Any], where: str, seen: _Seen, programme: _Programme) -> None:
        out: Callable[[str], None] = lambda text: self.problem(f"{where}: {text}")  # noqa: E731
        _members(record, set(_COMMON) | _KIND_MEMBERS["interval"], "the record")
        account = _str(record["account"], "account")
        span = _obj(record["interval"], "interval")
        _members(span, {"start", "end", "local_start"}, "interval")
        start = _utc_ns(span["start"], "interval start")
        end = _utc_ns(span["end"], "interval end")
        expected_id = record_id(record["gateway"], account, start)
        if seen.id != expected_id:
            out(f"id is not derived from gateway, account and interval start ({expected_id})")
        length = programme.interval_s * NS
        if end - start != length:
            out(
                f"the interval is {(end - start) / NS:g} s long, not interval_s {programme.interval_s} "
                f"of epoch {self.epoch}"
            )
        if start % length:
            out(f"the interval start {_show_ts(start)} is not on the grid of interval_s {programme.interval_s}")
        local = _local(start // NS, programme.zone) if start % NS == 0 else None
        day, clock, offset = local if local is not None else (None, None, None)
        local_text = span["local_start"]
        if not _local_matches(local_text, start, offset):
            expected_local = _show_local(start, offset)
            out(f"local_start {local_text!r} is not the start in {programme.zone.key} ({expected_local})")
        info = _Interval(seen.line, seen.seq, seen.id, account, start, end, day, clock, None, None, None, False)
        earlier = self.intervals.get((account, start))
        if earlier is not None:
            out(
                f"double issue: this account's interval starting {_show_ts(start)} was issued already "
                f"({earlier.where()})"
            )
        else:
            self.intervals[(account, start)] = info
            self.spans.setdefault(account, []).append(info)
        self.interval_ids[seen.id] = info

        rules = programme.accounts.get(account)
        if rules is None:
            out(f"account {account} is not in the programme of epoch {self.epoch}")
            return
        try:
            self._interval_figures(record, out, info, rules, programme)
        finally:  # even a malformed record belongs to its day (settlements) and may make the day abnormal
            if day is not None and clock is not None and earlier is None:
                self.days.setdefault((account, day), []).append(info)
                slot = (account, day, clock)
                if slot not in self.slots or self.slots[slot].start > start:
                    self.slots[slot] = info
                if info.flagged:
                    self.abnormal.setdefault((account, day), seen.seq)

    def _interval_figures(
        self,
        record: dict[str, Any],
        out: Callable[[str], None],
        info: _Interval,
        rules: _AccountRules,
        programme: _Programme,
    ) -> None:
        """Every figure, step by step: meters -> energy -> baseline -> flags -> status, delta, saving -> CO2e."""
        flags = _sorted_unique(_list(record["flags"], "flags"), "flags", _FLAGS)
        notes = _sorted_unique(_list(record["notes"], "notes"), "notes", _NOTES)
        info.flagged = bool(flags)
        stated_kwh, results = self._meters(
            record, out, info=info, rules=rules, programme=programme, flags=flags, notes=notes
        )
        energy = _micro(record["energy_kwh"], "energy_kwh")
        info.energy = energy
        if energy != sum(stated_kwh):
            out(f"energy_kwh {_fmt(energy)} is not the sum of its meters' kwh ({_fmt(sum(stated_kwh))})")
        if energy < 0:
            out(f"negative energy_kwh {_fmt(energy)}")
        baseline = self._baseline(record["baseline"], out, info, rules, programme)
        derived_flags = _derived_flags(results, out, info=info, rules=rules, programme=programme, baseline=baseline)
        delta, saving = _payout(
            record,
            out,
            info=info,
            programme=programme,
            flags=flags,
            derived_flags=derived_flags,
            baseline=baseline,
            energy=energy,
        )
        _co2e(record, out, info=info, programme=programme, energy=energy, delta=delta, saving=saving)

    def _meters(
        self,
        record: dict[str, Any],
        out: Callable[[str], None],
        *,
        info: _Interval,
        rules: _AccountRules,
        programme: _Programme,
        flags: list[str],
        notes: list[str],
    ) -> tuple[list[int], list[tuple[str, _MeterResult, list[str]]]]:
        """Each meter's kWh re-derived from its readings; the record's flags and notes as the union of its meters'.
        Returns the stated kWh of every meter and, for the programme's meters, what their readings give."""
        meters = _list(record["meters"], "meters")
        names = [_str(_obj(m, "meters entry").get("meter"), "meter") for m in meters]
        expected_names = [m.meter for m in rules.meters]
        if names != expected_names:
            out(f"meters {names} are not the account's meters in the programme ({expected_names})")
        by_name = {m.meter: m for m in rules.meters}
        stated_kwh: list[int] = []
        meter_flags: set[str] = set()
        meter_notes: set[str] = set()
        results: list[tuple[str, _MeterResult, list[str]]] = []
        for meter in meters:
            _members(meter, {"meter", "readings", "allocated_kwh", "outliers", "kwh", "flags", "notes"}, "meters entry")
            name = meter["meter"]
            kwh = _micro(meter["kwh"], f"meter {name}: kwh")
            stated_kwh.append(kwh)
            stated_flags = _sorted_unique(_list(meter["flags"], f"meter {name}: flags"), f"meter {name}: flags", _FLAGS)
            stated_notes = _sorted_unique(_list(meter["notes"], f"meter {name}: notes"), f"meter {name}: notes", _NOTES)
            meter_flags.update(stated_flags)
            meter_notes.update(stated_notes)
            if kwh < 0:
                out(f"meter {name}: negative energy, kwh {_fmt(kwh)}")
            meter_rules = by_name.get(name)
            if meter_rules is None:
                continue
            result = _meter_energy(meter, meter_rules, info.start, info.end, programme.max_gap_s * NS)
            for text in result.problems:
                out(text)
            if result.kwh != kwh:
                out(f"meter {name}: kwh {_fmt(kwh)} is not what its readings give ({_fmt(result.kwh)})")
            if result.rollover != ("rollover" in stated_notes):
                out(f"meter {name}: note rollover {'missing' if result.rollover else 'without a rollover'}")
            results.append((name, result, stated_flags))
        if flags != sorted(meter_flags):
            out(f"flags {flags} are not the union of the meters' flags {sorted(meter_flags)}")
        if notes != sorted(meter_notes):
            out(f"notes {notes} are not the union of the meters' notes {sorted(meter_notes)}")
        return stated_kwh, results

    def _baseline(
        self, value: Any, out: Callable[[str], None], info: _Interval, rules: _AccountRules, programme: _Programme
    ) -> int | None:
        """Checks the record's baseline; returns its ``kwh`` in µkWh (None when there is none)."""
        if value is None and rules.baseline.method == "like_days":
            # too few usable like days; with the whole stream at hand that can be checked
            if self.whole and self.from_genesis and info.day is not None and info.clock is not None:
                usable = self._like_days(info, rules.baseline, programme.exclude)
                if len(usable) >= rules.baseline.min_days:
                    out(
                        f"baseline is null although the stream has {len(usable)} usable like day(s) "
                        f"(min_days {rules.baseline.min_days})"
                    )
            return None
        body = _obj(value, "baseline")
        method = body.get("method")
        if method != rules.baseline.method:
            raise _Bad(f"baseline method {method!r} is not the programme's ({rules.baseline.method!r})")
        if method == "fixed":
            _members(body, {"method", "kwh"}, "baseline")
            fixed = _micro(body["kwh"], "baseline kwh")
            if fixed != rules.baseline.kwh:
                out(f"baseline kwh {_fmt(fixed)} is not the programme's fixed {_fmt(rules.baseline.kwh or 0)}")
            return fixed
        _members(body, {"method", "kwh", "days"}, "baseline")
        kwh = _micro(body["kwh"], "baseline kwh")
        days: list[tuple[int, int]] = []
        for item in _list(body["days"], "baseline days"):
            entry = _obj(item, "baseline days entry")
            _members(entry, {"start", "kwh"}, "baseline days entry")
            days.append((_utc_ns(entry["start"], "baseline day start"), _micro(entry["kwh"], "baseline day kwh")))
        like = rules.baseline
        problems_before = len(self.report.problems)
        if len(days) > like.days:
            out(f"baseline lists {len(days)} days, more than the programme's {like.days}")
        if len(days) < like.min_days:
            out(f"baseline has {len(days)} day(s), fewer than min_days {like.min_days}: it must be null")
        if days:
            mean = _div_half_even(sum(k for _, k in days), len(days))
            if mean != kwh:
                out(f"baseline kwh {_fmt(kwh)} is not the mean of its days ({_fmt(mean)})")
        if info.day is None or info.clock is None:
            return kwh
        previous_day: int | None = None
        for start, day_kwh in days:
            if start % NS:
                out(f"baseline day {_show_ts(start)} is not an interval start")
                continue
            local = _local(start // NS, programme.zone)
            if local is None:
                out(f"baseline day {_show_ts(start)} is outside the calendar in {programme.zone.key}")
                continue
            day, clock, _ = local
            if clock != info.clock:
                out(
                    f"baseline day {_show_ts(start)} is at local {_show_clock(clock)}, not at this interval's "
                    f"{_show_clock(info.clock)}"
                )
            if not 1 <= info.day - day <= like.lookback_days:
                out(
                    f"baseline day {_show_day(day)} is not among the {like.lookback_days} days before "
                    f"{_show_day(info.day)}"
                )
            if _weekend(day) != _weekend(info.day):
                out(f"baseline day {_show_day(day)} is not a like day of {_show_day(info.day)} (Mon-Fri / Sat-Sun)")
            if day in programme.exclude:
                out(f"baseline day {_show_day(day)} is an excluded date")
            if previous_day is not None and day >= previous_day:
                out("baseline days are not listed newest first, one per day")
            previous_day = day
            used = self.intervals.get((info.account, start))
            if used is None:
                where = f"line {info.line} (seq {info.seq}, {info.id})"
                self.pending_days.append(_PendingDay(where, info.seq, info.account, start, day_kwh))
                continue
            if used.flagged:
                out(f"baseline day {_show_ts(start)} is a flagged interval ({used.where()})")
            elif (info.account, day) in self.abnormal:
                out(
                    f"baseline day {_show_day(day)} is abnormal: the account had a flagged interval that day "
                    f"(seq {self.abnormal[(info.account, day)]})"
                )
            if used.energy is not None and used.energy != day_kwh:
                out(
                    f"baseline day {_show_ts(start)}: kwh {_fmt(day_kwh)} is not that interval's energy_kwh "
                    f"{_fmt(used.energy)} ({used.where()})"
                )
        if self.whole and self.from_genesis and len(self.report.problems) == problems_before:
            expected = self._like_days(info, like, programme.exclude)
            listed = [start for start, _ in days]
            if listed != expected:
                out(
                    "baseline days are not the newest usable like days in the stream: expected "
                    f"[{', '.join(_show_ts(s) for s in expected)}], listed [{', '.join(_show_ts(s) for s in listed)}]"
                )
        return kwh

    def _like_days(self, info: _Interval, like: _BaselineRules, exclude: frozenset[int]) -> list[int]:
        """Starts of the intervals a like-days baseline of ``info`` must use, from the records before it."""
        assert info.day is not None and info.clock is not None
        weekend = _weekend(info.day)
        found: list[int] = []
        for back in range(1, like.lookback_days + 1):
            day = info.day - back
            if _weekend(day) != weekend or day in exclude or (info.account, day) in self.abnormal:
                continue
            used = self.slots.get((info.account, day, info.clock))
            if used is None or used.flagged:
                continue
            found.append(used.start)
            if len(found) == like.days:
                break
        return found

    # -- settlement records ------------------------------------------------------------------------------------

    def _settlement(self, record: dict[str, Any], where: str, seen: _Seen, programme: _Programme) -> None:
        out: Callable[[str], None] = lambda text: self.problem(f"{where}: {text}")  # noqa: E731
        _members(record, set(_COMMON) | _KIND_MEMBERS["settlement"], "the record")
        account = _str(record["account"], "account")
        day = _day_ordinal(record["day"], "day")
        expected_id = settlement_id(record["gateway"], account, record["day"])
        if seen.id != expected_id:
            out(f"id is not derived from gateway, account and day ({expected_id})")
        if programme.netting != "day":
            out(f"a settlement record under epoch {self.epoch}, whose netting is {programme.netting!r}")
        entries: list[tuple[str, int, int, int]] = []
        for item in _list(record["intervals"], "intervals"):
            entry = _obj(item, "intervals entry")
            _members(entry, {"id", "seq", "delta_kwh", "co2e_delta_kg"}, "intervals entry")
            entries.append(
                (
                    _str(entry["id"], "intervals entry id"),
                    _int(entry["seq"], "intervals entry seq", minimum=1),
                    _micro(entry["delta_kwh"], "intervals entry delta_kwh"),
                    _micro(entry["co2e_delta_kg"], "intervals entry co2e_delta_kg"),
                )
            )
        seqs = [e[1] for e in entries]
        if seqs != sorted(set(seqs)) or len({e[0] for e in entries}) != len(entries):
            out("intervals are not listed once each in seq order")
        net = sum(e[2] for e in entries)
        co2e = sum(e[3] for e in entries)
        stated_net = _micro(record["net_kwh"], "net_kwh")
        if stated_net != net:
            out(f"net_kwh {_fmt(stated_net)} is not the sum of the listed deltas ({_fmt(net)})")
        saving = _micro(record["saving_kwh"], "saving_kwh")
        if saving != max(0, stated_net):
            out(f"saving_kwh {_fmt(saving)} is not max(0, net_kwh) ({_fmt(max(0, stated_net))})")
        saved = _micro(record["co2e_saved_kg"], "co2e_saved_kg")
        expected_saved = max(0, co2e) if saving > 0 else 0
        if saved != expected_saved:
            out(
                f"co2e_saved_kg {_fmt(saved)} is not "
                f"{'max(0, sum of the listed co2e deltas)' if saving > 0 else '0'} ({_fmt(expected_saved)})"
            )
        settlement = _Settlement(where, seen.line, seen.seq, seen.id, account, day, entries)
        earlier = self.settled.get((account, day))
        if earlier is not None:
            out(f"a second settlement of this account for {record['day']} ({earlier.where})")
            return
        self.settled[(account, day)] = settlement
        self.settlements.append(settlement)

    # -- after the last line -----------------------------------------------------------------------------------

    def finish(self, checkpoint: Any) -> VerifyReport:
        self._chain()
        for foreign, numbers in self.foreign_keys.items():
            given = ", ".join(sorted(self.keys)) or "none"
            shown = ", ".join(str(n) for n in numbers[:5]) + (", ..." if len(numbers) > 5 else "")
            self.problem(
                f"{len(numbers)} record(s) signed by key {foreign}, not by the given key ({given}): lines {shown}"
            )
        missing = self._gaps()
        self._overlaps()
        self._settlement_lists(missing)
        self._absent_days(missing)
        if checkpoint is not None:
            self._checkpoint(checkpoint)
        report = self.report
        if self.by_seq:
            report.first_seq, report.last_seq = min(self.by_seq), max(self.by_seq)
        if report.records == 0 and not report.problems:
            self.problem("no records found")
        return report

    def _chain(self) -> None:
        for seq, seen in sorted(self.by_seq.items()):
            where = f"line {seen.line} (seq {seq}, {seen.id})"
            prev_hash = seen.prev_hash
            if seq == 1:
                if prev_hash != GENESIS_HASH:
                    self.problem(f"{where}: the genesis record must carry prev_hash {GENESIS_HASH[:8]}... (64 zeros)")
                continue
            before = self.by_seq.get(seq - 1)
            # an untrusted or missing predecessor is reported on its own; do not report the same fault twice
            if before is not None and before.trusted and seen.trusted and before.hash != prev_hash:
                self.problem(
                    f"{where}: hash chain broken: prev_hash is not the hash of seq {seq - 1} (line {before.line})"
                )

    def _gaps(self) -> _MissingSeqs:
        """Reports missing seqs between the first and last record; returns every missing seq below the last."""
        seqs = sorted(self.by_seq)
        allowed: range = range(0)
        if self.from_seq is not None and seqs:
            allowed = range(seqs[0] + 1, self.from_seq)
        parts: list[str] = []
        count = 0
        for before, after in pairwise(seqs):
            if after == before + 1:
                continue
            for low, high in _outside(before + 1, after - 1, allowed):
                parts.append(str(low) if low == high else f"{low}..{high}")
                count += high - low + 1
        if count:
            self.problem(f"gap: seq {', '.join(parts)} missing ({count} record(s))")
        return _MissingSeqs(self.by_seq.keys(), seqs[-1] if seqs else 0)

    def _overlaps(self) -> None:
        for spans in self.spans.values():
            spans.sort(key=lambda s: (s.start, s.line))
            reach: _Interval | None = None
            for span in spans:
                if reach is not None and span.start < reach.end:
                    self.problem(
                        f"line {span.line} (seq {span.seq}, {span.id}): the interval {_show_ts(span.start)}.."
                        f"{_show_ts(span.end)} overlaps {_show_ts(reach.start)}..{_show_ts(reach.end)} of the same "
                        f"account ({reach.where()})"
                    )
                if reach is None or span.end > reach.end:
                    reach = span

    def _settlement_lists(self, missing: _MissingSeqs) -> None:
        for settlement in self.settlements:
            listed: set[str] = set()
            for rid, seq, delta, co2e in settlement.entries:
                listed.add(rid)
                entry = f"{settlement.where}: entry {rid} (seq {seq})"
                info = self.interval_ids.get(rid)
                if info is None:
                    if (
                        rid in self.untrusted_ids
                        or seq in missing
                        or (self.from_seq is not None and seq < self.from_seq)
                    ):
                        continue  # reported as a gap, a bad record or outside a partial export
                    self.problem(f"{entry}: no interval record with that id in the stream")
                    continue
                wrong = []
                if info.account != settlement.account:
                    wrong.append("another account")
                if info.day != settlement.day:
                    wrong.append(f"local day {_show_day(info.day) if info.day is not None else '?'}")
                if info.seq != seq:
                    wrong.append(f"seq {info.seq}")
                if info.seq > settlement.seq:
                    wrong.append("issued after the settlement")
                if info.delta is not None and info.delta != delta:
                    wrong.append(f"delta_kwh {_fmt(info.delta)}")
                if info.co2e_delta is not None and info.co2e_delta != co2e:
                    wrong.append(f"co2e_delta_kg {_fmt(info.co2e_delta)}")
                if wrong:
                    self.problem(f"{entry}: differs from that record ({info.where()}): {', '.join(wrong)}")
            for info in self.days.get((settlement.account, settlement.day), []):
                if info.id not in listed:
                    self.problem(
                        f"{settlement.where}: the interval {_show_ts(info.start)} ({info.where()}) of "
                        f"{_show_day(settlement.day)} is missing from the settlement"
                    )

    def _absent_days(self, missing: _MissingSeqs) -> None:
        for pending in self.pending_days:
            used = self.intervals.get((pending.account, pending.start))
            if used is not None:
                self.problem(
                    f"{pending.where}: baseline day {_show_ts(pending.start)} is a record issued after this one "
                    f"({used.where()})"
                )
            elif self.from_genesis and not missing and not self.untrusted_ids:
                self.problem(
                    f"{pending.where}: baseline day {_show_ts(pending.start)}: the stream has no interval record of "
                    "this account starting then"
                )

    def _checkpoint(self, checkpoint: Any) -> None:
        problems = checkpoint_problems(checkpoint, self.public_keys)
        if problems:
            self.report.problems.extend(f"checkpoint: {p}" for p in problems)
            return
        seq, expected = checkpoint["seq"], checkpoint["hash"]
        if self.gateway is not None and (checkpoint["gateway"], checkpoint["site"]) != (self.gateway, self.site):
            self.problem(
                f"checkpoint: gateway {checkpoint['gateway']!r} / site {checkpoint['site']!r} is not the stream's"
            )
            return
        last = max(self.by_seq, default=0)
        if seq > last:
            low = last + 1
            self.problem(f"tail missing: seq {low}..{seq}" if low < seq else f"tail missing: seq {seq}")
            return
        seen = self.by_seq.get(seq)
        if seen is None:
            self.problem(f"checkpoint: seq {seq} is not in the stream")
            return
        if seen.hash != expected:
            self.problem(
                f"checkpoint: seq {seq} in the stream (line {seen.line}) has hash {seen.hash}, "
                f"the checkpoint says {expected}"
            )
            return
        if seen.epoch != checkpoint["epoch"]:
            self.problem(f"checkpoint: epoch {checkpoint['epoch']} is not that of seq {seq} ({seen.epoch})")
            return
        self.report.checkpoint_seq = seq


def _derived_flags(
    results: list[tuple[str, _MeterResult, list[str]]],
    out: Callable[[str], None],
    *,
    info: _Interval,
    rules: _AccountRules,
    programme: _Programme,
    baseline: int | None,
) -> set[str]:
    """The flags each meter's readings give against the baseline (stuck, resolution), compared with the stated
    ones; returns every derived flag."""
    by_name = {m.meter: m for m in rules.meters}
    derived_flags: set[str] = set()
    for name, result, stated_flags in results:
        derived = dict(result.flags)
        declared = set(_DECLARED_FLAGS)
        if baseline is not None and baseline > 0 and "gap" not in derived:
            run = _frozen_run(result.readings, info.start, info.end, programme.interval_s * NS)
            if result.kwh == 0:
                derived["stuck"] = f"no advance over the interval while the baseline expects {_fmt(baseline)} kWh"
            elif run is not None:
                derived.setdefault(
                    "stuck",
                    f"the readings stay at {_fmt(run[0][1])} from {_show_ts(run[0][0])} to {_show_ts(run[1][0])}, "
                    "longer than one interval",
                )
            elif _may_run_on(result.readings):
                declared.add("stuck")
        if baseline is not None:
            step = _resolution_step(result.readings, by_name[name])
            if step > _share_of(programme.resolution_share, baseline):
                derived.setdefault(
                    "resolution",
                    f"the counter's step {float(step):g} kWh is coarser than resolution_share of the baseline",
                )
        derived_flags.update(derived)
        for flag in sorted(derived.keys() - set(stated_flags)):
            out(f"meter {name}: flag {flag} missing: {derived[flag]}")
        for flag in sorted(set(stated_flags) - derived.keys() - declared):
            out(f"meter {name}: flag {flag} is not derivable from its readings")
    return derived_flags


def _payout(
    record: dict[str, Any],
    out: Callable[[str], None],
    *,
    info: _Interval,
    programme: _Programme,
    flags: list[str],
    derived_flags: set[str],
    baseline: int | None,
    energy: int,
) -> tuple[int, int]:
    """Status, delta and saving as the flags and the baseline give them; returns the stated (delta, saving)."""
    status = record["status"]
    if not isinstance(status, str) or status not in _STATUSES:
        raise _Bad(f"status {status!r} is not one of {sorted(_STATUSES)}")
    expected_status = (
        "incomplete" if "gap" in flags else "flagged" if flags else "no_baseline" if baseline is None else "measured"
    )
    if status != expected_status:
        out(f"status {status!r} is not what its flags and baseline give ({expected_status!r})")
    delta = _micro(record["delta_kwh"], "delta_kwh")
    info.delta = delta
    expected_delta = baseline - energy if status == "measured" and baseline is not None else 0
    if delta != expected_delta:
        out(f"delta_kwh {_fmt(delta)} is not {'baseline - energy' if expected_delta else '0'} ({_fmt(expected_delta)})")
    saving = _micro(record["saving_kwh"], "saving_kwh")
    expected_saving = max(0, delta) if programme.netting == "interval" else 0
    if saving != expected_saving:
        rule = "max(0, delta)" if programme.netting == "interval" else "0 with netting by day"
        out(f"saving_kwh {_fmt(saving)} is not {rule} ({_fmt(expected_saving)})")
    if saving > 0 and (flags or derived_flags or status != "measured"):
        shown = ", ".join(sorted(set(flags) | derived_flags)) or "none"
        out(f"a saving of {_fmt(saving)} kWh on a flagged interval (flags: {shown}; status {status})")
    return delta, saving


def _co2e(
    record: dict[str, Any],
    out: Callable[[str], None],
    *,
    info: _Interval,
    programme: _Programme,
    energy: int,
    delta: int,
    saving: int,
) -> None:
    """The emission factor in force at the interval's local start, and each CO2e figure as kWh x that factor."""
    factor = _factor(record["emission_factor_kg_per_kwh"], "emission_factor_kg_per_kwh")
    if info.clock is not None:
        expected_factor = programme.factor_at(info.clock)
        if factor != expected_factor:
            out(
                f"emission_factor_kg_per_kwh {factor} is not the programme's at local "
                f"{_show_clock(info.clock)} ({expected_factor})"
            )
    for name, figure, base in (("co2e_kg", "energy_kwh", energy), ("co2e_delta_kg", "delta_kwh", delta),
                               ("co2e_saved_kg", "saving_kwh", saving)):  # fmt: skip
        stated = _micro(record[name], name)
        expected = _times_factor(base, factor)
        if name == "co2e_delta_kg":
            info.co2e_delta = stated
        if stated != expected:
            out(f"{name} {_fmt(stated)} is not {figure} x emission factor ({_fmt(expected)})")


def _outside(low: int, high: int, allowed: range) -> list[tuple[int, int]]:
    """The runs of ``low..high`` outside ``allowed`` (one contiguous run, so at most two are left), found by
    arithmetic: a signed seq may jump by 2**62."""
    if not allowed:
        return [(low, high)]
    runs = []
    if low < allowed.start:
        runs.append((low, min(high, allowed.start - 1)))
    if high >= allowed.stop:
        runs.append((max(low, allowed.stop), high))
    return runs


@dataclass(frozen=True, slots=True)
class _MissingSeqs:
    """The seqs below ``last`` that the stream lacks, as a rule rather than a set: a signed seq of 2**62 must not
    make verify allocate the numbers below it."""

    present: KeysView[int]
    last: int

    def __contains__(self, seq: object) -> bool:
        return isinstance(seq, int) and 1 <= seq < self.last and seq not in self.present

    def __bool__(self) -> bool:
        return self.last > len(self.present)  # every present seq is in 1..last


@lru_cache(maxsize=1 << 12)
def _show_local(start: int, offset: int | None) -> str:
    if offset is None:
        return "?"
    moment = datetime(1970, 1, 1) + timedelta(seconds=start // NS + offset)
    sign = "-" if offset < 0 else "+"
    hours, minutes = divmod(abs(offset) // 60, 60)
    return f"{_iso(moment)}{sign}{hours:02d}:{minutes:02d}"


def _local_matches(text: Any, start: int, offset: int | None) -> bool:
    if offset is None or not isinstance(text, str):
        return False
    if text == _show_local(start, offset):
        return True
    if _LOCAL_TS.fullmatch(text) is None:
        return False
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return False
    stated_offset = moment.utcoffset()
    if stated_offset is None or int(stated_offset.total_seconds()) != offset:
        return False
    return moment.replace(tzinfo=None) == datetime(1970, 1, 1) + timedelta(seconds=start // NS + offset)


def _unwrap(item: Any) -> Any:
    """An outbox/MQTT event envelope carries the record in ``body``."""
    if isinstance(item, dict) and "signature" not in item and isinstance(item.get("body"), dict):
        return item["body"]
    return item


def _canonical(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _common_shape(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    for name, kind in _COMMON.items():
        if name not in record:
            return f"missing field {name!r}"
        value = record[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"field {name!r} has the wrong type"
    if record["schema"] != SCHEMA_ID:
        return f"unknown schema {record['schema']!r} (this verifier knows {SCHEMA_ID})"
    if record["kind"] not in _KINDS:
        return f"unknown kind {record['kind']!r}"
    if record["seq"] < 1 or record["epoch"] < 1:
        return "seq and epoch must be 1 or more"
    if _HEX64.fullmatch(record["prev_hash"]) is None or _HEX64.fullmatch(record["programme"]) is None:
        return "prev_hash and programme must be SHA-256 hex digests"
    return None


def _duplicate_key(text: bytes) -> str | None:
    """The first key that appears twice in one JSON object of ``text``, if any (orjson keeps the last silently)."""
    found: list[str] = []

    def check(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen and not found:
                found.append(key)
            seen.add(key)
        return dict(pairs)

    json.loads(text, object_pairs_hook=check)
    return found[0] if found else None


def verify_lines(
    lines: Iterable[bytes | str],
    public_keys: Iterable[Ed25519PublicKey],
    *,
    from_seq: int | None = None,
    checkpoint: Any = None,
) -> VerifyReport:
    """Check every record of a stream; one problem string per problem found (none for a clean stream).

    ``from_seq``: the stream is a partial export starting at that seq, preceded by the epoch record in force.
    ``checkpoint``: a parsed chain-head checkpoint; the stream must hold its seq with exactly its hash.
    """
    verifier = _Verifier(public_keys, from_seq)
    for number, raw in enumerate(lines, start=1):
        verifier.feed(number, raw)
    return verifier.finish(checkpoint)
