"""Taking the status snapshot (``gateway.status.GatewayStatus``): one function per part, each reading that part's
typed status. A part whose status call raises is recorded with its error, so the page shows it instead of failing.
Called by ``Gateway.status_snapshot``; must never import the HTTP server, a driver or a protocol library.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from gateway.driver_api import DeviceStatus, Source
from gateway.status import (
    DeviceCounting,
    IncentivesStatus,
    OutboxStatus,
    QueueStatus,
    RulesStatus,
    SourceCounting,
    UplinkFailure,
    UplinkRunnerPart,
    UplinkStatus,
)

if TYPE_CHECKING:
    from gateway.aggregate import BuildingAggregate
    from gateway.bus import Subscription
    from gateway.incentives.stage import IncentiveStage
    from gateway.live import LiveCache
    from gateway.outbox import Outbox
    from gateway.rule_report import ReloadResult, RuleProblemLog
    from rules.runtime import RuleRuntime
    from rules.runtime import RuleStatus as RuleState

log = logging.getLogger(__name__)


def copy_device(status: DeviceStatus) -> DeviceStatus:
    """A copy a view may hold while the driver goes on counting."""
    return replace(status, failures=dict(status.failures), info=dict(status.info))


def device_counters(sources: Iterable[Source]) -> dict[str, Mapping[str, object]]:
    """Per device, what a message-driven source counted; a source whose call fails is skipped (logged at debug)
    rather than breaking the device list."""
    found: dict[str, Mapping[str, object]] = {}
    for source in sources:
        if not isinstance(source, DeviceCounting):
            continue
        name = source.name
        try:
            for device, counters in source.device_counters().items():
                found[device] = {"source": name, **counters}
        except Exception:
            log.debug("device counters of %s failed", name, exc_info=True)
    return found


def source_counters(sources: Iterable[Source]) -> dict[str, Mapping[str, object]]:
    """Per message-driven source: the device counters summed, plus messages that reached no device."""
    found: dict[str, Mapping[str, object]] = {}
    for source in sources:
        if not isinstance(source, SourceCounting):
            continue
        name = source.name
        try:
            found[name] = dict(source.source_counters())
        except Exception:
            log.debug("source counters of %s failed", name, exc_info=True)
    return found


def awaiting(aggregate: BuildingAggregate | None) -> dict[str, str]:
    """Points with no value yet that are not late: the building aggregate before its first period has ended (it is
    sent once per period, by design, docs/privacy.md). Point -> when its first value comes, for the page."""
    if aggregate is None or aggregate.sent or aggregate.skipped:
        return {}  # sent already, or skipped because a meter is missing: then "never" is the truth
    due = aggregate.next_ns
    when = time.strftime("%H:%M:%S", time.localtime(due / 1e9)) if due else "the end of the first period"
    return {aggregate.point: f"first sum at {when}"}


def history(live: LiveCache, point: str | None) -> dict[str, tuple[tuple[int, float], ...]]:
    rings = live.history
    selected = rings.items() if point is None else ([(point, rings[point])] if point in rings else [])
    return {name: tuple(ring) for name, ring in selected}


def rules_status(runtime: RuleRuntime | None, problems: RuleProblemLog, reload: ReloadResult | None) -> RulesStatus:
    """The runtime's states; a status call that raises is shown with its error instead of taking the page down."""
    states: tuple[RuleState, ...] = ()
    error: str | None = None
    if runtime is not None:
        try:
            states = tuple(runtime.status())
        except Exception as exc:
            log.debug("rule status failed", exc_info=True)
            error = f"rule status failed: {exc}"
    return RulesStatus(
        loaded=runtime is not None,
        rules=states,
        problems=tuple(str(p) for p in problems.open()),
        resolved_problems=tuple(p.resolved_text() for p in problems.resolved()),
        reload=reload,
        error=error,
    )


def uplink_status(runner: UplinkRunnerPart) -> UplinkStatus | UplinkFailure:
    """The runner's figures under the runner's name; a status call that raises is shown as that error."""
    try:
        status = runner.status()
    except Exception as exc:
        log.debug("uplink status failed", exc_info=True)
        return UplinkFailure(name=runner.name, state="unknown", last_error=f"status failed: {exc}")
    status["name"] = runner.name
    return status


def queue_status(sub: Subscription) -> QueueStatus:
    return QueueStatus(
        name=sub.name,
        policy=sub.policy,
        depth=sub.depth(),
        capacity=sub.maxsize,
        delivered_samples=sub.stats.delivered_samples,
        dropped_samples=sub.stats.dropped_samples,
        blocked_s=round(sub.stats.blocked_seconds, 3),
    )


def outbox_status(outbox: Outbox | None) -> OutboxStatus | None:
    if outbox is None:
        return None
    stats = outbox.stats
    copied = replace(
        stats,
        dropped_by_cursor=dict(stats.dropped_by_cursor),
        cursors={name: dict(cursor) for name, cursor in stats.cursors.items()},
    )
    return OutboxStatus(
        writable=outbox.writable(),
        stats=copied,
        telemetry_budget=outbox.telemetry_budget,
        event_budget=outbox.event_budget,
        disk_margin=outbox.disk_margin,
        disk_usage=outbox.disk_usage(),
    )


def incentives_status(stage: IncentiveStage | None, timezone: str, *, records: bool) -> IncentivesStatus:
    """Today's records (in the gateway's time zone; read from the ledger only when ``records``), or why there are
    none; refused readings by reason (invalid, future, late_dropped, ...): never silently dropped."""
    if stage is None:
        return IncentivesStatus(False, None, (), None, {}, 0, None)
    day = datetime.now(ZoneInfo(timezone)).date()
    refused = {reason: count for reason, count in stage.counters.items() if reason != "clock_steps"}
    error: str | None = None
    found: tuple[Mapping[str, object], ...] = ()
    try:
        if records:
            found = tuple(dict(record) for record in stage.records_of_day(day))
    except Exception as exc:
        log.debug("incentive records failed", exc_info=True)
        error = f"cannot read records: {exc}"
    return IncentivesStatus(
        enabled=True,
        day=day.isoformat(),
        records=found,
        error=error,
        refused=refused,
        clock_steps=stage.counters.get("clock_steps", 0),
        epoch=stage.epoch,
    )
