"""Baselines: what an account would have used in an interval had it not saved.

Owns the calendar arithmetic of like days (weekday or weekend, same local start time, DST gaps skipped). Pure: the
history lookup is passed in, so the stage decides where history lives and tests pass a dict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from zoneinfo import ZoneInfo

from gateway.incentives.config import Baseline, FixedBaseline
from gateway.incentives.energy import MICRO

NS = 1_000_000_000

#: interval starts -> micro-kWh of those that have an unflagged interval record on a day that counts
HistoryLookup = Callable[[Sequence[int]], dict[int, int]]


@dataclass(frozen=True, slots=True)
class BaselineValue:
    method: str
    micro_kwh: int
    #: (interval start, micro-kWh) of each like day that went into the mean, newest first; empty for ``fixed``
    days: tuple[tuple[int, int], ...] = ()


def local_start(start_ns: int, zone: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(start_ns // NS, zone)


def is_weekend(moment: datetime) -> bool:
    return moment.weekday() >= 5


def like_day_starts(start_ns: int, interval_ns: int, zone: ZoneInfo, lookback_days: int) -> list[int]:
    """Starts of the same local interval on earlier like days, newest first.

    A day on which that local time does not exist (spring-forward gap) or does not fall on the interval grid is
    skipped; on a fall-back day the first occurrence of a repeated time is used.
    """
    here = local_start(start_ns, zone)
    wall = here.time().replace(fold=0)
    weekend = is_weekend(here)
    starts: list[int] = []
    for back in range(1, lookback_days + 1):
        day = here.date() - timedelta(days=back)
        candidate = datetime.combine(day, wall, tzinfo=zone)
        if is_weekend(candidate) != weekend:
            continue
        seconds = int(candidate.timestamp())
        round_trip = datetime.fromtimestamp(seconds, zone)
        if round_trip.replace(tzinfo=None) != candidate.replace(tzinfo=None):
            continue  # the wall time does not exist that day
        if (seconds * NS) % interval_ns:
            continue
        starts.append(seconds * NS)
    return starts


def compute_baseline(
    baseline: Baseline,
    start_ns: int,
    interval_ns: int,
    zone: ZoneInfo,
    history: HistoryLookup,
    *,
    skip_day: Callable[[date], bool] = lambda _day: False,
) -> BaselineValue | None:
    """The baseline for the interval starting at ``start_ns``, or None when history is too thin.

    ``skip_day`` names the local days that never count (excluded dates, abnormal days); ``history`` answers which
    candidate intervals have an unflagged record and their energy.
    """
    if isinstance(baseline, FixedBaseline):
        micro = int((baseline.kwh * MICRO).to_integral_value(rounding=ROUND_HALF_EVEN))
        return BaselineValue("fixed", micro)
    candidates = [
        start
        for start in like_day_starts(start_ns, interval_ns, zone, baseline.lookback_days)
        if not skip_day(local_start(start, zone).date())
    ]
    found = history(candidates)
    used = [(start, found[start]) for start in candidates if start in found][: baseline.days]
    if len(used) < baseline.min_days:
        return None
    mean = (Decimal(sum(micro for _, micro in used)) / len(used)).to_integral_value(rounding=ROUND_HALF_EVEN)
    return BaselineValue("like_days", int(mean), days=tuple(used))


def clock_time(start_ns: int, zone: ZoneInfo) -> time:
    return local_start(start_ns, zone).time()
