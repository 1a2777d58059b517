"""The programme: every setting that changes money, canonicalised and hashed.

Owns the programme body that an epoch record carries (``docs/incentives.md``) and the per-account, per-meter rules
derived from the site file. Accounts and meters appear only as pseudonyms, so the body can travel to the platform.
Pure: no SQLite, no clock; the stage stores the body and compares hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from functools import lru_cache
from typing import Any

from gateway.incentives.config import (
    AccountConfig,
    Baseline,
    FixedBaseline,
    IncentivesConfig,
    power_limit_kw,
)
from gateway.incentives.energy import MICRO, MeterRules, Replacement, format_micro
from gateway.incentives.record import Pseudonymizer, programme_hash
from gateway.registry import PointRegistry

NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class AccountPlan:
    """One account as the stage works with it."""

    real_id: str
    pseudonym: str
    meters: tuple[str, ...]
    rules: dict[str, MeterRules]
    baseline: Baseline


@dataclass(frozen=True, slots=True)
class Programme:
    body: dict[str, Any]
    hash: str
    accounts: tuple[AccountPlan, ...]


def micro_of(kwh: Decimal) -> int:
    return int((kwh * MICRO).to_integral_value(rounding=ROUND_HALF_EVEN))


@lru_cache(maxsize=1024)
def _utc_date(day: int) -> str:
    return datetime.fromtimestamp(day * 86_400, UTC).strftime("%Y-%m-%dT")


def iso_ns(ns: int) -> str:
    """UTC ISO 8601 with only the fraction digits it needs: ``2026-12-01T10:00:00Z``, ``...:00.5Z``.

    Every reading of every record goes through here: the date is cached, the clock formatted by hand."""
    seconds, rest = divmod(ns, NS)
    day, second = divmod(seconds, 86_400)
    hours, second = divmod(second, 3600)
    minutes, second = divmod(second, 60)
    fraction = f".{rest:09d}".rstrip("0") if rest else ""
    return f"{_utc_date(day)}{hours:02d}:{minutes:02d}:{second:02d}{fraction}Z"


def _baseline_body(baseline: Baseline) -> dict[str, Any]:
    if isinstance(baseline, FixedBaseline):
        return {"method": "fixed", "kwh": format_micro(micro_of(baseline.kwh))}
    return {
        "method": "like_days",
        "days": baseline.days,
        "min_days": baseline.min_days,
        "lookback_days": baseline.lookback_days,
    }


def _watts(kw: float) -> int:
    """A kW limit as whole watts, rounded up (a limit is never made tighter by rounding)."""
    return int((Decimal(repr(kw)) * 1000).to_integral_value(rounding=ROUND_CEILING))


def _meter_rules(config: IncentivesConfig, account: AccountConfig, meter: str, registry: PointRegistry) -> MeterRules:
    info = registry.get(meter)
    limit = power_limit_kw(config, account, info.max_power_kw if info is not None else None)
    if limit is None:  # refused by validate_against before the stage opens; kept as a guard for direct callers
        raise ValueError(f"meter {meter!r} has no power limit")
    swaps = tuple(
        Replacement(
            r.at_ns,
            micro_of(r.old_final_kwh) if r.old_final_kwh is not None else None,
            micro_of(r.new_initial_kwh) if r.new_initial_kwh is not None else None,
        )
        for r in account.replacements
        if r.point == meter
    )
    return MeterRules(
        limit_w=_watts(limit),
        resolution_micro=max(1, micro_of(config.meter_resolution_kwh())),
        wrap_micro=micro_of(config.counter.wrap_kwh) if config.counter is not None else None,
        replacements=swaps,
    )


def build_programme(
    config: IncentivesConfig, registry: PointRegistry, pseudonyms: Pseudonymizer, zone_name: str
) -> Programme:
    """The programme of a site: its canonical body, hash and the accounts' rules."""
    plans: list[AccountPlan] = []
    accounts_body: list[dict[str, Any]] = []
    for account in config.accounts:
        rules = {meter: _meter_rules(config, account, meter, registry) for meter in account.meters}
        baseline = account.baseline if account.baseline is not None else config.baseline
        plan = AccountPlan(
            real_id=account.id,
            pseudonym=pseudonyms.account(account.id),
            meters=tuple(account.meters),
            rules=rules,
            baseline=baseline,
        )
        plans.append(plan)
        meters_body = [
            {
                "meter": pseudonyms.meter(meter),
                "limit_w": rule.limit_w,
                "resolution_kwh": format_micro(rule.resolution_micro),
                "wrap_kwh": None if rule.wrap_micro is None else format_micro(rule.wrap_micro),
                "replacements": [
                    {
                        "at": iso_ns(swap.at_ns),
                        "old_final_kwh": None if swap.old_final_micro is None else format_micro(swap.old_final_micro),
                        "new_initial_kwh": None
                        if swap.new_initial_micro is None
                        else format_micro(swap.new_initial_micro),
                    }
                    for swap in rule.replacements
                ],
            }
            for meter, rule in rules.items()
        ]
        meters_body.sort(key=lambda m: str(m["meter"]))
        accounts_body.append({"account": plan.pseudonym, "baseline": _baseline_body(baseline), "meters": meters_body})
    accounts_body.sort(key=lambda a: str(a["account"]))
    factor = config.emission_factor
    body: dict[str, Any] = {
        "interval_s": int(config.interval),
        "max_gap_s": _seconds(config.max_gap),
        "settle_s": _seconds(config.settle),
        "max_delay_s": _seconds(config.max_delay),
        "max_clock_skew_s": _seconds(config.max_clock_skew),
        "netting": config.netting,
        "timezone": zone_name,
        "resolution_share": str(config.resolution_share),
        "exclude_dates": sorted(d.isoformat() for d in config.exclude_dates),
        "emission_factor": {
            "kg_per_kwh": str(factor.kg_per_kwh),
            "by_time_of_day": [
                {"from": _hhmm(w.start), "to": _hhmm(w.end), "kg_per_kwh": str(w.kg_per_kwh)}
                for w in factor.by_time_of_day
            ],
        },
        "pseudonym_key": pseudonyms.fingerprint,
        "accounts": accounts_body,
    }
    return Programme(body=body, hash=programme_hash(body), accounts=tuple(plans))


def _seconds(value: float) -> int:
    return int(Decimal(repr(value)).to_integral_value(rounding=ROUND_CEILING))


def _hhmm(moment: Any) -> str:
    # time.max stands for "24:00" (the end of the day) in the config
    return "24:00" if moment.hour == 23 and moment.minute == 59 and moment.second == 59 else moment.strftime("%H:%M")


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which money settings differ, in words an operator can act on: ``interval_s 3600 -> 900, accounts``."""
    parts: list[str] = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if key == "pseudonym_key":
            parts.append("the pseudonym key")
        elif isinstance(before, int | str) and isinstance(after, int | str):
            parts.append(f"{key} {before} -> {after}")
        else:
            parts.append(key)
    return ", ".join(parts) or "nothing"
