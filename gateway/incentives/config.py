"""The ``incentives:`` block of a site file: accounts, meters, interval, baseline, emission factor, keys.

Owns the config models and the site-level cross-check ``validate_against(site)`` (meter points must exist in the
point registry). Must never import the stage, SQLite, or any protocol library: config stays cheap to load and
``edge-gateway check`` uses it without touching the ledger.

Numbers that end up in signed records (kWh, kg CO2e/kWh) are kept as ``Decimal`` from the text the engineer wrote,
so ``0.5703`` stays exactly ``0.5703`` and never becomes ``0.57029999...``.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from pydantic import BeforeValidator, Field, PlainSerializer, field_validator, model_validator

from gateway.config.types import Duration, PointId, PositiveDuration, StrictModel
from gateway.errors import Diagnostic

if TYPE_CHECKING:
    from gateway.config.source import Loc
    from gateway.registry import PointRegistry

DAY_SECONDS = 86_400


def _decimal(value: Any) -> Decimal:
    """A non-negative decimal from YAML: ``0.5703``, ``"0.5703"`` or ``2``; floats go through their shortest repr."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError("expected a number, like 0.5703")
    try:
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a number") from None
    if not number.is_finite() or number < 0:
        raise ValueError(f"{value!r} must be a finite number >= 0")
    return number


#: a non-negative exact decimal (kWh, kg/kWh), printed back as text
NonNegativeDecimal = Annotated[Decimal, BeforeValidator(_decimal), PlainSerializer(str)]

_HHMM_RE = re.compile(r"^([01]\d|2[0-4]):([0-5]\d)$")


def _clock_time(value: Any) -> time:
    if not isinstance(value, str) or not _HHMM_RE.match(value):
        raise ValueError(f'{value!r} is not a time of day: write it as HH:MM in quotes, like "07:30"')
    hours, minutes = int(value[:2]), int(value[3:])
    if hours == 24:
        if minutes:
            raise ValueError(f"{value!r} is past the end of the day")
        return time.max
    return time(hours, minutes)


ClockTime = Annotated[time, BeforeValidator(_clock_time)]


class FixedBaseline(StrictModel):
    """The same expected consumption for every interval: ``{method: fixed, kwh: 0.25}``."""

    method: Literal["fixed"]
    kwh: NonNegativeDecimal


class LikeDaysBaseline(StrictModel):
    """Mean of the same interval (same local start time) on the last ``days`` like days (weekday or weekend),
    the way demand-response customer baselines are computed. Only complete intervals without a discontinuity
    count; with fewer than ``min_days`` of them no saving is issued."""

    method: Literal["like_days"]
    days: Annotated[int, Field(ge=1, le=60)] = 10
    min_days: Annotated[int, Field(ge=1)] = 3
    #: how far back to look for like days with usable data
    lookback_days: Annotated[int, Field(ge=1, le=366)] = 45

    @model_validator(mode="after")
    def _min_not_above_days(self) -> LikeDaysBaseline:
        if self.min_days > self.days:
            raise ValueError(f"min_days ({self.min_days}) cannot exceed days ({self.days})")
        return self


Baseline = Annotated[FixedBaseline | LikeDaysBaseline, Field(discriminator="method")]


class FactorWindow(StrictModel):
    """A time-of-day emission factor, local time, ``from`` inclusive, ``to`` exclusive; may wrap past midnight."""

    start: ClockTime = Field(alias="from")
    end: ClockTime = Field(alias="to")
    kg_per_kwh: NonNegativeDecimal

    model_config = StrictModel.model_config | {"populate_by_name": True}

    def contains(self, moment: time) -> bool:
        if self.start <= self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end


class EmissionFactor(StrictModel):
    """Grid emission factor in kg CO2e per kWh; the first matching time-of-day window wins, else ``kg_per_kwh``."""

    kg_per_kwh: NonNegativeDecimal
    by_time_of_day: list[FactorWindow] = Field(default_factory=list)

    def at(self, moment: time) -> Decimal:
        for window in self.by_time_of_day:
            if window.contains(moment):
                return window.kg_per_kwh
        return self.kg_per_kwh


class CounterConfig(StrictModel):
    """A register counter that wraps: a 32-bit count of 0.01 kWh wraps at 42,949,672.96 kWh."""

    bits: Literal[16, 32, 48, 64]
    resolution_kwh: NonNegativeDecimal = Decimal("0.01")

    @field_validator("resolution_kwh")
    @classmethod
    def _positive(cls, value: Decimal) -> Decimal:
        if value <= 0:
            raise ValueError("resolution_kwh must be > 0")
        return value

    @property
    def wrap_kwh(self) -> Decimal:
        return Decimal(2**self.bits) * self.resolution_kwh


class MeterReplacement(StrictModel):
    """A declared meter swap: readings before ``at`` come from the old meter, from ``at`` on from the new one."""

    point: PointId
    at: datetime
    #: the old meter's last reading and the new one's first; without them the swap interval has unknown energy
    old_final_kwh: NonNegativeDecimal | None = None
    new_initial_kwh: NonNegativeDecimal | None = None

    @field_validator("at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("give the replacement time with its UTC offset, like 2026-11-20T10:03:00+08:00")
        return value

    @property
    def at_ns(self) -> int:
        return int(self.at.timestamp()) * 1_000_000_000 + self.at.microsecond * 1000


class AccountConfig(StrictModel):
    """One rewarded account. ``id`` is the real account id: it stays on the gateway, records carry a keyed hash."""

    id: Annotated[str, Field(min_length=1, max_length=200)]
    meters: Annotated[list[PointId], Field(min_length=1)]
    replacements: list[MeterReplacement] = Field(default_factory=list)
    #: overrides the site-wide baseline for this account
    baseline: Baseline | None = None
    #: readings implying more power than this are implausible (a jump): the interval is never rewarded
    max_power_kw: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> AccountConfig:
        if len(set(self.meters)) != len(self.meters):
            raise ValueError(f"account {self.id!r} lists a meter twice")
        for replacement in self.replacements:
            if replacement.point not in self.meters:
                raise ValueError(f"replacement names {replacement.point!r}, which is not a meter of this account")
        return self


class IncentivesConfig(StrictModel):
    """``incentives:`` in the site file. Relative key paths are resolved against the gateway's data directory
    (where its ledger lives), so the demo and a fresh install keep keys beside the state they sign.

    Every setting that changes money is part of the programme (``gateway/incentives/programme.py``): the ledger
    refuses a changed programme until an operator starts a new epoch."""

    accounts: Annotated[list[AccountConfig], Field(min_length=1)]
    interval: PositiveDuration = 900.0
    #: the longest time between two readings that an interval edge may be interpolated across (else flag ``gap``)
    max_gap: PositiveDuration = 300.0
    #: how long after its end a complete interval waits for late readings before it is issued
    settle: Duration = 60.0
    #: how long an interval waits for late (backfilled) readings before it is closed as incomplete
    max_delay: Duration = 3600.0
    #: a reading stamped further than this ahead of the gateway's clock is refused (and counted)
    max_clock_skew: PositiveDuration = 300.0
    #: ``day``: interval deltas are netted per local day in a settlement record; ``interval``: each pays max(0, delta)
    netting: Literal["day", "interval"] = "day"
    baseline: Baseline
    #: local dates never used as like days (public holidays, demand-response event days)
    exclude_dates: list[date] = Field(default_factory=list)
    emission_factor: EmissionFactor
    counter: CounterConfig | None = None
    #: the counter step of meters without a ``counter`` block
    resolution_kwh: NonNegativeDecimal = Decimal("0.001")
    #: a counter whose step is more than this share of the baseline cannot show a saving (flag ``resolution``)
    resolution_share: NonNegativeDecimal = Decimal("0.1")
    #: the supply limit of every account that does not declare its own (kW); a meter's device rating also counts
    max_power_kw: Annotated[float, Field(gt=0)] | None = None
    #: local zone for like days and time-of-day factors; defaults to the gateway's
    timezone: str | None = None
    signing_key_file: Path
    pseudonym_key_file: Path
    #: create missing key files on first start (no record issued yet); never used once a ledger exists
    generate_missing_keys: bool = False

    #: the old name of what max_gap and settle now do: kept only to say so at its own line
    edge_tolerance: Any = Field(default=None, exclude=True)

    @field_validator("edge_tolerance", mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        raise ValueError(
            "edge_tolerance is gone: interval edges are now interpolated between the readings that straddle "
            "them; use max_gap (longest gap to interpolate across, default 5min) and settle (wait before "
            "issuing, default 1min)"
        )

    @field_validator("interval")
    @classmethod
    def _grid(cls, value: float) -> float:
        if value != int(value) or value < 60 or DAY_SECONDS % int(value):
            raise ValueError("interval must be whole minutes that divide a day (1min, 5min, 15min, 30min, 1h, ...)")
        return value

    @field_validator("resolution_kwh")
    @classmethod
    def _positive_resolution(cls, value: Decimal) -> Decimal:
        if value <= 0:
            raise ValueError("resolution_kwh must be > 0")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name like Asia/Shanghai)") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> IncentivesConfig:
        if self.max_delay < self.settle:
            raise ValueError("max_delay must be at least settle")
        if self.settle > self.interval:
            raise ValueError("settle must be at most the interval")
        return self

    @property
    def interval_ns(self) -> int:
        return int(self.interval) * 1_000_000_000

    def meter_resolution_kwh(self) -> Decimal:
        return self.counter.resolution_kwh if self.counter is not None else self.resolution_kwh


class _WithIncentives(Protocol):
    @property
    def incentives(self) -> IncentivesConfig | None: ...


class CheckedSite(Protocol):
    """What ``validate_against`` reads of a loaded site (``gateway.config.site_types.Site`` is one). A protocol, not
    the ``Site`` class: the site's schema holds this module's models, so naming ``Site`` here made an import cycle."""

    @property
    def config(self) -> _WithIncentives: ...

    @property
    def registry(self) -> PointRegistry: ...

    def diagnostic(self, loc: Loc, message: str) -> Diagnostic: ...


def validate_against(site: CheckedSite) -> list[Diagnostic]:
    """Cross-checks that need the whole site or several accounts: every meter is a known numeric kWh point and
    belongs to one account only; account ids are unique (positioned at the offending entry)."""
    config = site.config.incentives
    if config is None:
        return []
    problems: list[Diagnostic] = []
    first_use: dict[str, str] = {}
    seen_accounts: set[str] = set()
    for a_index, account in enumerate(config.accounts):
        if account.id in seen_accounts:
            problems.append(
                site.diagnostic(("incentives", "accounts", a_index, "id"), f"duplicate account id {account.id!r}")
            )
        seen_accounts.add(account.id)
        for m_index, meter in enumerate(account.meters):
            loc = ("incentives", "accounts", a_index, "meters", m_index)
            info = site.registry.get(meter)
            if meter in first_use:
                owner = first_use[meter]
                problems.append(site.diagnostic(loc, f"meter {meter!r} already belongs to account {owner!r}"))
            first_use.setdefault(meter, account.id)
            if info is None:
                problems.append(site.diagnostic(loc, f"meter point {meter!r} is not a point of any device"))
            elif info.kind not in ("float", "int"):
                problems.append(site.diagnostic(loc, f"meter point {meter!r} is {info.kind}, not a numeric counter"))
            elif info.unit is not None and info.unit.lower() not in ("kwh", "kw·h", "kw.h"):
                message = f"meter point {meter!r} is in {info.unit}, expected cumulative kWh"
                problems.append(site.diagnostic(loc, message))
            elif power_limit_kw(config, account, info.max_power_kw) is None:
                # without a limit a bad reading cannot be told from consumption (a single 0 paid 680 kWh once)
                message = (
                    f"meter {meter!r} has no power limit: give the account's max_power_kw (its declared supply), "
                    "incentives.max_power_kw, or max_power_kw on the point in its device profile"
                )
                problems.append(site.diagnostic(loc, message))
    return problems


def power_limit_kw(config: IncentivesConfig, account: AccountConfig, rating_kw: float | None) -> float | None:
    """The tightest of the limits declared for a meter: the account's supply, the programme's default, the meter's
    device rating. None when nothing is declared (a config error for a meter in an account)."""
    declared = [kw for kw in (account.max_power_kw, config.max_power_kw, rating_kw) if kw is not None]
    return min(declared) if declared else None
