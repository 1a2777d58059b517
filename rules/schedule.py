"""Weekly time windows in a time zone (``schedules:`` in rule files), evaluated against Unix-nanosecond clocks.

Owns ``Schedule.active(ts_ns)``. Days, holidays and midnight crossing are judged in the schedule's own time zone,
so a ``22:00``-``06:00`` Friday night shift in Asia/Shanghai is right whatever zone the gateway's clock uses.
Imports nothing from the runtime.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from rules.config import ScheduleConfig, minutes_of, parse_days

_ONE_DAY = dt.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Schedule:
    name: str
    days: frozenset[int]
    #: minutes after local midnight; ``end <= start`` crosses midnight (equal means the whole day)
    start: int
    end: int
    zone: ZoneInfo
    holidays: frozenset[dt.date]

    @classmethod
    def from_config(cls, name: str, config: ScheduleConfig, default_zone: str) -> Schedule:
        return cls(
            name=name,
            days=parse_days(config.days),
            start=minutes_of(config.start),
            end=minutes_of(config.end),
            zone=ZoneInfo(config.tz or default_zone),
            holidays=frozenset(config.holidays),
        )

    def _day_on(self, day: dt.date) -> bool:
        return day.weekday() in self.days and day not in self.holidays

    def active(self, ts_ns: int) -> bool:
        local = dt.datetime.fromtimestamp(ts_ns / 1e9, self.zone)
        minute = local.hour * 60 + local.minute
        today = local.date()
        if self.start < self.end:
            return self.start <= minute < self.end and self._day_on(today)
        if self.start == self.end:
            return self._day_on(today)
        # crosses midnight: the evening part belongs to today, the early-morning part to yesterday's period
        if minute >= self.start:
            return self._day_on(today)
        if minute < self.end:
            return self._day_on(today - _ONE_DAY)
        return False
