"""The rule file's shape: pydantic models for ``points``, ``schedules``, ``allow`` and ``rules``.

Owns structure only (which keys exist, their types, which combinations are allowed). Expressions stay text here;
``rules.loader`` compiles them and checks names against the point registry. Imports no runtime code.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from gateway.config.types import Duration, Ident, PointId, PositiveDuration, StrictModel, parse_duration

RULE_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
_TIME_RE = re.compile(r"^([01]?\d|2[0-4]):([0-5]\d)$")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
AGGREGATES = ("avg", "min", "max", "sum", "count", "integrate", "rate")

#: a literal value or, as text starting with ``=``, an expression
ActionValue = float | int | bool | str


def _optional_positive_duration(value: Any) -> float | None:
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("the duration must be more than zero")
    return seconds


#: seconds or absent. Written as one Annotated type (not ``PositiveDuration | None``) so the parser stays attached
#: to the field itself, where StrictModel's no-coercion check looks for it.
OptionalPositiveDuration = Annotated[float | None, BeforeValidator(_optional_positive_duration)]


def _rule_id(value: Any) -> str:
    if not isinstance(value, str) or not RULE_ID_RE.match(value):
        raise ValueError(f"{value!r} is not a valid rule id: use lowercase letters, digits, - and _")
    return value


class DerivedPointConfig(StrictModel):
    """A point computed by the rules: ``expr``, one window aggregate, or neither (a virtual point set by rules)."""

    expr: str | None = None
    avg: PointId | None = None
    min: PointId | None = None
    max: PointId | None = None
    sum: PointId | None = None
    count: PointId | None = None
    integrate: PointId | None = None
    rate: PointId | None = None
    window: OptionalPositiveDuration = None
    #: ``integrate`` and ``rate`` are per second unless ``per`` says otherwise (``per: 1h`` turns kW into kWh)
    per: PositiveDuration = 1.0
    #: for virtual points: the value type and the value before any rule sets it
    kind: Literal["float", "int", "bool", "str"] | None = None
    initial: ActionValue | None = None
    unit: str | None = None
    description: str | None = None
    #: personal data, never sent raw to the city platform. A point computed from a personal point is personal
    #: anyway (``false`` there is an error); a virtual point needs ``true`` to be set from personal points.
    personal: bool | None = None

    def aggregate(self) -> tuple[str, str] | None:
        """(function, source point) of a window aggregate, or None."""
        for name in AGGREGATES:
            source = getattr(self, name)
            if source is not None:
                return name, source
        return None

    @model_validator(mode="after")
    def _one_definition(self) -> DerivedPointConfig:
        aggregates = [name for name in AGGREGATES if getattr(self, name) is not None]
        if len(aggregates) > 1:
            raise ValueError(f"a derived point has one aggregate; got {', '.join(aggregates)}")
        if aggregates and self.expr is not None:
            raise ValueError(f"give either expr or {aggregates[0]}, not both")
        if aggregates and self.window is None:
            raise ValueError(f"{aggregates[0]} needs a window, like window: 15min")
        if not aggregates and self.window is not None:
            raise ValueError("window is only used with avg, min, max, sum, count, integrate or rate")
        virtual = self.expr is None and not aggregates
        if virtual and self.kind is None:
            raise ValueError(
                "a point without expr or an aggregate is a virtual point set by rules: give its kind "
                "(float, int, bool or str)"
            )
        if not virtual and (self.kind is not None or self.initial is not None):
            raise ValueError("kind and initial are only for virtual points (no expr, no aggregate)")
        return self


class ScheduleConfig(StrictModel):
    """``{days: mon-fri, from: "07:00", to: "19:00", tz: Asia/Shanghai, holidays: [2026-10-01]}``.

    ``to`` earlier than ``from`` crosses midnight; the day (and holiday) is the day the period starts.
    """

    days: str = "mon-sun"
    start: str = Field(alias="from")
    end: str = Field(alias="to")
    tz: str | None = None
    holidays: list[dt.date] = Field(default_factory=list)

    @field_validator("start", "end")
    @classmethod
    def _clock_time(cls, value: str) -> str:
        match = _TIME_RE.match(value)
        if not match or (match.group(1) == "24" and match.group(2) != "00"):
            raise ValueError(f"invalid time {value!r}: use HH:MM, 00:00 to 24:00 (quote it in YAML)")
        return value

    @field_validator("days")
    @classmethod
    def _days(cls, value: str) -> str:
        parse_days(value)
        return value

    @field_validator("tz")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r} (use an IANA name like Asia/Shanghai)") from None
        return value


def parse_days(text: str) -> frozenset[int]:
    """``mon-fri`` / ``mon,wed,fri`` / ``sat-sun`` / ``daily`` -> weekday numbers (Monday 0)."""
    text = text.strip().lower()
    if text in ("daily", "all", "every day"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if first not in _DAYS or (last and last not in _DAYS):
            raise ValueError(f"invalid days {text!r}: use mon-fri, sat-sun, mon,wed,fri or daily")
        start = _DAYS.index(first)
        stop = _DAYS.index(last) if last else start
        day = start
        while True:
            days.add(day)
            if day == stop:
                break
            day = (day + 1) % 7  # fri-mon wraps over the weekend
    return frozenset(days)


def minutes_of(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


#: BACnet priorities an allowlist entry may not take (ASHRAE 135 clause 19.2.1.1: 1-2 life safety, 6 minimum on/off);
#: the same set as ``drivers.bacnet.config.RESERVED_PRIORITIES``, repeated because rules never import a driver (a
#: test keeps the two equal)
RESERVED_PRIORITIES = frozenset({1, 2, 6})


class AllowEntry(StrictModel):
    """One write rules (and the platform) may make: a point and its bounds, and for a point with a priority array
    (BACnet) the slot it is written at and whether it may be relinquished."""

    point: PointId
    min: float | None = None
    max: float | None = None
    #: for bool or str points: the values that may be written
    values: list[bool | int | float | str] | None = None
    #: BACnet priority slot of this point's writes and relinquishes; None: the device profile's (default 8). A
    #: driver without priorities (Modbus, MQTT) refuses every write of an entry that sets one
    priority: Annotated[int, Field(ge=1, le=16)] | None = None
    #: rules (``write: {point, relinquish: true}``) and the platform (``"relinquish": true``) may release the slot
    relinquish: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> AllowEntry:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        if self.priority in RESERVED_PRIORITIES:
            raise ValueError(
                f"priority {self.priority} is reserved (1-2 life safety, 6 minimum on/off); use 8 (manual operator) "
                "or a slot between 9 and 16"
            )
        return self


class WriteAction(StrictModel):
    """``write: {point, value}``, or ``write: {point, relinquish: true}`` to release the point's priority slot."""

    point: PointId
    value: ActionValue | None = None
    relinquish: bool = False

    @model_validator(mode="after")
    def _value_or_relinquish(self) -> WriteAction:
        if self.relinquish and self.value is not None:
            raise ValueError("a write has a value or relinquish: true, not both")
        if not self.relinquish and self.value is None:
            raise ValueError("a write needs a value (or relinquish: true to release the point's priority slot)")
        return self


class SetAction(StrictModel):
    point: PointId
    value: ActionValue


class PublishAction(StrictModel):
    #: relative to the platform prefix (``{prefix}/{site}/{gateway}/``)
    topic: str
    payload: Any = None

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        if not value or value.startswith("/") or value.endswith("/") or "//" in value:
            raise ValueError(f"invalid topic {value!r}: use segments like alerts/zone3/co2")
        if any(c in value for c in "+#\x00"):
            raise ValueError(f"invalid topic {value!r}: + and # are subscription wildcards, not allowed here")
        return value


class AlarmAction(StrictModel):
    """Raises an alarm when the rule fires; the alarm clears by itself when the rule clears."""

    severity: Literal["info", "minor", "major", "critical"] = "major"
    message: str
    subject: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class EventAction(StrictModel):
    type: Ident
    message: str | None = None
    subject: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class Action(StrictModel):
    """One step of ``then`` / ``on_clear``: exactly one of write, publish, alarm, event, set."""

    write: WriteAction | None = None
    publish: PublishAction | None = None
    alarm: AlarmAction | None = None
    event: EventAction | None = None
    set: SetAction | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Action:
        given = [name for name in ("write", "publish", "alarm", "event", "set") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "each action is exactly one of write, publish, alarm, event, set"
                + (f"; got {', '.join(given)}" if given else "")
            )
        return self

    @property
    def kind(self) -> str:
        for name in ("write", "publish", "alarm", "event", "set"):
            if getattr(self, name) is not None:
                return name
        raise AssertionError("validated Action without a kind")


class RuleConfig(StrictModel):
    id: Annotated[str, Field(min_length=1)]
    description: str | None = None
    enabled: bool = True
    when: str | None = None
    hold: Duration = Field(default=0.0, alias="for")
    clear_when: str | None = None
    only_during: Ident | None = None
    cooldown: Duration = 0.0
    every: OptionalPositiveDuration = None
    let: dict[Ident, str] = Field(default_factory=dict)
    then: list[Action] = Field(default_factory=list)
    on_clear: list[Action] = Field(default_factory=list)

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: Any) -> str:
        return _rule_id(value)

    @model_validator(mode="after")
    def _combinations(self) -> RuleConfig:
        if self.when is None:
            if self.every is None:
                raise ValueError("a rule needs when: (a condition) or every: (a period), or both")
            for key, given in (("for", self.hold), ("clear_when", self.clear_when), ("on_clear", self.on_clear)):
                if given:
                    raise ValueError(f"{key} needs when:")
        if not self.then and not self.on_clear:
            raise ValueError("a rule needs then: (actions), or it can never do anything")
        return self


class RuleFileConfig(StrictModel):
    version: Literal[1]
    description: str | None = None
    points: dict[PointId, DerivedPointConfig] = Field(default_factory=dict)
    schedules: dict[Ident, ScheduleConfig] = Field(default_factory=dict)
    #: group label (usually the driver: modbus, mqtt, simulator) -> writes allowed
    allow: dict[Ident, list[AllowEntry]] = Field(default_factory=dict)
    rules: list[RuleConfig] = Field(default_factory=list)
