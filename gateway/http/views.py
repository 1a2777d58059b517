"""Read-only views of a running gateway as plain JSON-ready data: the single source of the page, the API and ``status``.

Owns the *shape* of what operators see (points, devices, rules, uplinks, queues, alarms, readiness). Every function
reads the supervisor's live objects and returns dicts, lists, strings and numbers only, so the HTML page, the JSON
API and the terminal picture can never disagree. Must never import aiohttp, a driver or a protocol library, and must
never mutate the gateway.

The rule runtime, the uplink runners and the incentive stage are written by other parts of the project and may be
absent or shaped slightly differently from what is expected here: they are read defensively (``getattr``, any
mapping or dataclass accepted), and a component whose status call raises is shown with that error instead of
taking the page down.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from gateway import __version__
from gateway.driver_api import DeviceState, DeviceStatus

if TYPE_CHECKING:
    from gateway.supervisor import Gateway

log = logging.getLogger(__name__)

JsonDict = dict[str, Any]

#: device states in which a driver is not delivering values
_DOWN_STATES = frozenset({DeviceState.OFFLINE, DeviceState.DISABLED})
#: uplink states that are not worth an alarm (anything else with a last error is)
_HEALTHY_UPLINK_STATES = frozenset({"connected", "ok", "up", "idle", "running", "sending", "online"})


def as_dict(obj: Any) -> JsonDict:
    """A status record of another component (dataclass, NamedTuple, mapping or plain object) as a dict."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    asdict = getattr(obj, "_asdict", None)
    if callable(asdict):
        return dict(asdict())
    if hasattr(obj, "__dict__"):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    return {"value": obj}


def _seconds_since(ts_ns: int | None, now_ns: int) -> float | None:
    if not ts_ns:
        return None
    return max(0.0, round((now_ns - ts_ns) / 1e9, 3))


# -- points ---------------------------------------------------------------------------------------------------------


def awaiting(gateway: Gateway) -> dict[str, str]:
    """Points with no value yet that are not late: the building aggregate before its first period has ended (it is
    sent once per period, by design, docs/privacy.md). Point -> when its first value comes, for the page."""
    aggregate = gateway.aggregate
    if aggregate is None or aggregate.sent or aggregate.skipped:
        return {}  # sent already, or skipped because a meter is missing: then "never" is the truth
    due = aggregate.next_ns
    when = time.strftime("%H:%M:%S", time.localtime(due / 1e9)) if due else "the end of the first period"
    return {aggregate.point: f"first sum at {when}"}


def points(gateway: Gateway, now_ns: int | None = None) -> list[JsonDict]:
    """Every registered point with its latest sample; ``tail`` relies on id/value/ts/quality/unit. ``awaiting``
    says why a point without a value is not late (see ``awaiting``), else it is None."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    gateway.live.watched()  # someone looks: the live cache keeps the sparklines' history (gateway/live.py)
    latest = gateway.live.latest
    not_due = awaiting(gateway)
    result: list[JsonDict] = []
    seen: set[str] = set()
    for point, info in gateway.registry.items():
        seen.add(point)
        sample = latest.get(point)
        result.append(
            {
                "id": point,
                "device": info.device,
                "name": info.name,
                "value": None if sample is None else sample.value,
                "ts": None if sample is None else sample.ts,
                "quality": None if sample is None else sample.quality.name.lower(),
                "age_s": None if sample is None else _seconds_since(sample.ts, now_ns),
                "unit": info.unit,
                "kind": info.kind,
                "writable": info.writable,
                "derived": not info.physical,
                # shown here (the page is local: loopback, or a token), withheld from the platform
                "personal": info.personal,
                "awaiting": not_due.get(point) if sample is None else None,
            }
        )
    # a sample for a point the registry does not know (a rule output added at run time) is still shown
    for point, sample in latest.items():
        if point not in seen:
            device, _, name = point.partition(".")
            result.append(
                {
                    "id": point,
                    "device": device,
                    "name": name,
                    "value": sample.value,
                    "ts": sample.ts,
                    "quality": sample.quality.name.lower(),
                    "age_s": _seconds_since(sample.ts, now_ns),
                    "unit": None,
                    "kind": None,
                    "writable": False,
                    "derived": True,
                    "personal": None,
                    "awaiting": None,
                }
            )
    return result


def history(gateway: Gateway, *, point: str | None = None, since_ns: int = 0) -> dict[str, list[list[float]]]:
    """Recent numeric history for sparklines: point -> ``[[ts_ms, value], ...]``, oldest first.

    Milliseconds keep the numbers exact in JavaScript (nanoseconds exceed 2**53).
    """
    gateway.live.watched()
    rings = gateway.live.history
    selected = rings.items() if point is None else ([(point, rings[point])] if point in rings else [])
    return {name: [[ts // 1_000_000, value] for ts, value in ring if ts > since_ns] for name, ring in selected}


# -- devices --------------------------------------------------------------------------------------------------------


def device_message_counters(gateway: Gateway) -> dict[str, JsonDict]:
    """Per device, what a message-driven source (MQTT) counted: messages, rejected, malformed and refused by
    reason, unavailable, undeclared fields. Read from sources offering ``device_counters()``; a source whose call
    fails is skipped (and logged at debug) rather than breaking the device list."""
    found: dict[str, JsonDict] = {}
    for source in gateway.sources:
        counters_fn = getattr(source, "device_counters", None)
        if counters_fn is None:
            continue
        try:
            for device, counters in counters_fn().items():
                found[device] = {"source": source.name, **counters}
        except Exception:
            log.debug("device counters of %s failed", source.name, exc_info=True)
    return found


def source_message_counters(gateway: Gateway) -> dict[str, JsonDict]:
    """Per message-driven source: the device counters summed, plus messages that reached no device."""
    found: dict[str, JsonDict] = {}
    for source in gateway.sources:
        counters_fn = getattr(source, "source_counters", None)
        if counters_fn is None:
            continue
        try:
            found[source.name] = dict(counters_fn())
        except Exception:
            log.debug("source counters of %s failed", source.name, exc_info=True)
    return found


def devices(gateway: Gateway, now_ns: int | None = None) -> list[JsonDict]:
    now_ns = time.time_ns() if now_ns is None else now_ns
    result: list[JsonDict] = []
    message_counters = device_message_counters(gateway)
    for status in gateway.device_status():
        good_polls = status.polls - status.errors
        result.append(
            {
                "id": status.device,
                "driver": status.driver,
                "counters": message_counters.get(status.device),
                "state": str(status.state),
                "since_s": _seconds_since(status.since_ns, now_ns),
                "polls": status.polls,
                "errors": status.errors,
                "last_ok_age_s": _seconds_since(status.last_ok_ns, now_ns),
                "last_error": status.last_error,
                "last_latency_ms": round(status.last_latency_s * 1000, 3),
                "mean_latency_ms": round(status.latency_sum_s / good_polls * 1000, 3) if good_polls > 0 else None,
                "points": len(gateway.registry.points_of(status.device)),
                **device_failures(status),
            }
        )
    return result


def device_failures(status: DeviceStatus) -> JsonDict:
    """Failed reads by reason and what the driver learned of the device (e.g. a Modbus meter's read limit)."""
    return {"failures": dict(status.failures), "driver_info": dict(status.info)}


# -- rules ----------------------------------------------------------------------------------------------------------


def _normalise_rule(raw: Any) -> JsonDict:
    entry = as_dict(raw)
    entry.setdefault("id", entry.get("rule") or entry.get("name") or "?")
    state = entry.get("state", "unknown")
    entry["state"] = str(getattr(state, "value", state)).lower()
    return entry


def rules(gateway: Gateway) -> JsonDict:
    """The rule runtime's per-rule states (idle/pending/active/failed), the problems still current (``problems``),
    the recent ones that are over (``resolved_problems``: a rule that waited for its first inputs at start-up) and
    the outcome of the last reload (``reload``: accepted, or refused with each error's ``file:line:col``)."""
    runtime = gateway.rules
    log_ = gateway.rule_problems
    reload = gateway.rule_reload
    view: JsonDict = {
        "loaded": runtime is not None,
        "rules": [],
        "problems": [str(p) for p in log_.open()],
        "resolved_problems": [p.resolved_text() for p in log_.resolved()],
        "reload": None if reload is None else reload.as_json(),
        "error": None,
    }
    if runtime is None:
        return view
    status_fn = getattr(runtime, "status", None)
    if not callable(status_fn):
        return {**view, "error": "rule runtime reports no status"}
    try:
        raw = status_fn()
    except Exception as exc:
        log.debug("rule status failed", exc_info=True)
        return {**view, "error": f"rule status failed: {exc}"}
    if isinstance(raw, Mapping):  # {rule_id: status} is accepted too
        raw = [{"id": key, **as_dict(value)} for key, value in raw.items()]
    return {**view, "rules": [_normalise_rule(r) for r in raw]}


# -- uplinks and queues ---------------------------------------------------------------------------------------------


def uplinks(gateway: Gateway) -> list[JsonDict]:
    result: list[JsonDict] = []
    for runner in gateway.uplinks:
        name = getattr(runner, "name", type(runner).__name__)
        try:
            status = as_dict(runner.status())
        except Exception as exc:
            log.debug("uplink status failed", exc_info=True)
            status = {"state": "unknown", "last_error": f"status failed: {exc}"}
        status["name"] = name
        result.append(status)
    return result


def queues(gateway: Gateway, now_ns: int | None = None) -> JsonDict:
    """Bus subscriber queues (in batches) and the durable outbox (in samples, bytes and events)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    bus = [
        {
            "name": sub.name,
            "policy": sub.policy,
            "depth": sub.depth(),
            "capacity": sub.maxsize,
            "delivered_samples": sub.stats.delivered_samples,
            "dropped_samples": sub.stats.dropped_samples,
            "blocked_s": round(sub.stats.blocked_seconds, 3),
        }
        for sub in gateway.bus.subscriptions()
    ]
    outbox = gateway.outbox
    if outbox is None:
        return {"bus": bus, "outbox": None}
    stats = outbox.stats
    return {
        "bus": bus,
        "outbox": {
            "writable": outbox.writable(),
            "last_error": stats.last_error,
            "telemetry_samples": stats.telemetry_samples,
            "telemetry_batches": stats.telemetry_batches,
            "telemetry_bytes": stats.telemetry_bytes,
            "telemetry_budget": outbox.telemetry_budget,
            "oldest_age_s": _seconds_since(stats.oldest_telemetry_ns, now_ns),
            "events": stats.event_count,
            "event_bytes": stats.event_bytes,
            "event_store_full": stats.event_store_full,
            "appended_samples": stats.appended_samples,
            "dropped_samples": stats.dropped_samples,
            "dropped_batches": stats.dropped_batches,
            "compacted_samples": stats.compacted_samples,
            "over_budget_s": _seconds_since(stats.pressure_since_ns, now_ns),
            "disk_bytes": outbox.disk_usage(),
            "disk_limit_bytes": outbox.telemetry_budget + outbox.event_budget + outbox.disk_margin,
        },
    }


# -- incentives and commands ----------------------------------------------------------------------------------------


def incentives_today(gateway: Gateway) -> JsonDict:
    """Today's incentive records (in the gateway's time zone), or why there are none."""
    stage = gateway.incentives
    if stage is None:
        return {"enabled": False, "day": None, "records": [], "error": None, "refused": {}, "clock_steps": 0}
    day = datetime.now(ZoneInfo(gateway.site.config.gateway.timezone)).date()
    # readings the stage refused or ignored, by reason (invalid, future, late_dropped, ...): never silently dropped
    refused = {reason: count for reason, count in stage.counters.items() if reason != "clock_steps"}
    error: str | None
    try:
        records = [as_dict(r) for r in stage.records_of_day(day)]
    except Exception as exc:
        log.debug("incentive records failed", exc_info=True)
        error = f"cannot read records: {exc}"
        records = []
    else:
        error = None
    return {
        "enabled": True,
        "day": day.isoformat(),
        "records": records,
        "error": error,
        "refused": refused,
        "clock_steps": stage.counters.get("clock_steps", 0),
    }


def recent_commands(gateway: Gateway, limit: int = 20) -> list[JsonDict]:
    return [dict(entry) for entry in gateway.commands.entries[-limit:]][::-1]


# -- health ---------------------------------------------------------------------------------------------------------


def readiness(gateway: Gateway) -> JsonDict:
    """``/readyz``: configuration loaded, outbox writable, at least one driver delivering (or about to)."""
    started = gateway.started.is_set()
    outbox = gateway.outbox
    outbox_ok = outbox is not None and outbox.writable()
    if outbox is None:
        outbox_detail = "outbox not open"
    elif outbox_ok:
        outbox_detail = "writable"
    else:
        outbox_detail = outbox.stats.last_error or "closed"
    statuses = gateway.device_status()
    running = [s for s in statuses if s.state not in _DOWN_STATES]
    drivers_ok = bool(gateway.sources) and bool(running)
    online = sum(1 for s in statuses if s.state is DeviceState.ONLINE)
    drivers_detail = f"{online} of {len(statuses)} devices online" if gateway.sources else "no driver configured"
    checks: dict[str, JsonDict] = {
        "config": {"ok": started, "detail": "loaded, gateway started" if started else "starting"},
        "outbox": {"ok": outbox_ok, "detail": outbox_detail},
        "drivers": {"ok": drivers_ok, "detail": drivers_detail},
    }
    return {"ready": all(c["ok"] for c in checks.values()), "checks": checks}


def alarms(
    gateway: Gateway,
    *,
    device_view: list[JsonDict],
    rule_view: JsonDict,
    uplink_view: list[JsonDict],
    queue_view: JsonDict,
) -> list[JsonDict]:
    """What needs an operator's attention now, worst first: active and failed rules, offline devices, a failing
    outbox, dropped telemetry, uplinks in error."""
    found: list[JsonDict] = []
    for rule in rule_view["rules"]:
        if rule["state"] == "active":
            found.append({"severity": "alarm", "source": f"rule {rule['id']}", "message": "condition active"})
        elif rule["state"] == "failed":
            error = rule.get("last_error") or rule.get("error") or "failed"
            found.append({"severity": "error", "source": f"rule {rule['id']}", "message": str(error)})
    if rule_view.get("error"):
        found.append({"severity": "error", "source": "rules", "message": rule_view["error"]})
    reload = rule_view.get("reload")
    if reload is not None and not reload["accepted"]:
        # the files on disk are not what runs: someone edited them and should hear why they were refused
        first = reload["diagnostics"][0] if reload["diagnostics"] else None
        where = f": {first['position']}: {first['message']}" if first else ""
        found.append({"severity": "warning", "source": "rules", "message": reload["message"] + where})
    found.extend(
        {
            "severity": "error",
            "source": f"device {device['id']}",
            "message": f"{device['state']}: {device['last_error'] or 'no answer'}",
        }
        for device in device_view
        if device["state"] in ("offline", "disabled")
    )
    found.extend(
        {"severity": "warning", "source": f"device {d['id']}", "message": f"degraded: {d['last_error']}"}
        for d in device_view
        if d["state"] == "degraded"
    )
    outbox = queue_view.get("outbox")
    if outbox is not None:
        if not outbox["writable"]:
            found.append(
                {"severity": "critical", "source": "outbox", "message": f"cannot write: {outbox['last_error']}"}
            )
        if outbox["event_store_full"]:
            found.append({"severity": "alarm", "source": "outbox", "message": "event store over its budget"})
        if outbox["dropped_samples"]:
            found.append(
                {
                    "severity": "warning",
                    "source": "outbox",
                    "message": f"{outbox['dropped_samples']} telemetry samples dropped (store budget)",
                }
            )
    for uplink in uplink_view:
        state = str(uplink.get("state", "")).lower()
        if uplink.get("last_error") and state not in _HEALTHY_UPLINK_STATES:
            found.append(
                {"severity": "warning", "source": str(uplink["name"]), "message": f"{state}: {uplink['last_error']}"}
            )
    order = {"critical": 0, "error": 1, "alarm": 2, "warning": 3}
    found.sort(key=lambda a: order.get(a["severity"], 9))
    return found


def overview(gateway: Gateway) -> JsonDict:
    """Everything at once: the status page's data, ``/api/status`` and ``edge-gateway status``."""
    now_ns = time.time_ns()
    identity = gateway.site.config.gateway
    device_view = devices(gateway, now_ns)
    rule_view = rules(gateway)
    uplink_view = uplinks(gateway)
    queue_view = queues(gateway, now_ns)
    return {
        "gateway": {
            "id": identity.id,
            "site": identity.site,
            "name": identity.name,
            "timezone": identity.timezone,
            "version": __version__,
            "uptime_s": _seconds_since(gateway.started_ns, now_ns),
            "now_ms": now_ns // 1_000_000,
        },
        "readiness": readiness(gateway),
        "alarms": alarms(
            gateway, device_view=device_view, rule_view=rule_view, uplink_view=uplink_view, queue_view=queue_view
        ),
        "devices": device_view,
        "points": points(gateway, now_ns),
        "rules": rule_view,
        "uplinks": uplink_view,
        "queues": queue_view,
        "incentives": incentives_today(gateway),
        "commands": recent_commands(gateway),
    }
