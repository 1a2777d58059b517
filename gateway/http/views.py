"""Read-only views of a running gateway as plain JSON-ready data: the single source of the page, the API and ``status``.

Owns the *shape* of what operators see (points, devices, rules, uplinks, queues, alarms, readiness). Every function
reads one typed, immutable snapshot (``gateway.status.GatewayStatus``, taken by ``Gateway.status_snapshot``; pass
the gateway and the function takes one, or pass a snapshot already taken) and returns dicts, lists, strings and
numbers only, so the HTML page, the JSON API and the terminal picture can never disagree. Must never import aiohttp,
the supervisor, a driver or a protocol library. A part whose status call raises is shown with that error (the
snapshot records it) instead of taking the page down.
"""

from __future__ import annotations

import dataclasses

from gateway import __version__
from gateway.driver_api import DeviceState, DeviceStatus
from gateway.status import GatewayStatus, StatusSource

JsonDict = dict[str, object]

#: device states in which a driver is not delivering values
_DOWN_STATES = frozenset({DeviceState.OFFLINE, DeviceState.DISABLED})
#: uplink states that are not worth an alarm (anything else with a last error is)
_HEALTHY_UPLINK_STATES = frozenset({"connected", "ok", "up", "idle", "running", "sending", "online"})


def snapshot(source: StatusSource | GatewayStatus, *, watch: bool = False, records: bool = False) -> GatewayStatus:
    """``source`` itself when it is a snapshot, else a new one (``watch``: someone looks at the points; ``records``:
    with today's incentive records)."""
    if isinstance(source, GatewayStatus):
        return source
    return source.status_snapshot(watch=watch, records=records)


def _seconds_since(ts_ns: int | None, now_ns: int) -> float | None:
    if not ts_ns:
        return None
    return max(0.0, round((now_ns - ts_ns) / 1e9, 3))


# -- points ---------------------------------------------------------------------------------------------------------


def points(source: StatusSource | GatewayStatus, now_ns: int | None = None) -> list[JsonDict]:
    """Every registered point with its latest sample; ``tail`` relies on id/value/ts/quality/unit. ``awaiting``
    says why a point without a value is not late (``gateway.status.awaiting``), else it is None."""
    # someone looks: the live cache keeps the sparklines' history (gateway/live.py)
    snap = snapshot(source, watch=True)
    now_ns = snap.now_ns if now_ns is None else now_ns
    latest = snap.latest
    not_due = snap.awaiting
    result: list[JsonDict] = []
    seen: set[str] = set()
    for info in snap.points:
        point = info.id
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


def history(source: StatusSource, *, point: str | None = None, since_ns: int = 0) -> dict[str, list[list[float]]]:
    """Recent numeric history for sparklines: point -> ``[[ts_ms, value], ...]``, oldest first.

    Milliseconds keep the numbers exact in JavaScript (nanoseconds exceed 2**53).
    """
    rings = source.status_snapshot(watch=True, history=True, point=point).history
    return {name: [[ts // 1_000_000, value] for ts, value in ring if ts > since_ns] for name, ring in rings.items()}


# -- devices --------------------------------------------------------------------------------------------------------


def device_message_counters(source: StatusSource | GatewayStatus) -> dict[str, JsonDict]:
    """Per device, what a message-driven source (MQTT) counted: messages, rejected, malformed and refused by
    reason, unavailable, undeclared fields (sources offering ``device_counters()``)."""
    return {device: dict(counters) for device, counters in snapshot(source).device_counters.items()}


def source_message_counters(source: StatusSource | GatewayStatus) -> dict[str, JsonDict]:
    """Per message-driven source: the device counters summed, plus messages that reached no device."""
    return {name: dict(counters) for name, counters in snapshot(source).source_counters.items()}


def devices(source: StatusSource | GatewayStatus, now_ns: int | None = None) -> list[JsonDict]:
    snap = snapshot(source)
    now_ns = snap.now_ns if now_ns is None else now_ns
    result: list[JsonDict] = []
    message_counters = device_message_counters(snap)
    points_per_device: dict[str, int] = {}
    for info in snap.points:
        points_per_device[info.device] = points_per_device.get(info.device, 0) + 1
    for status in snap.devices:
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
                "points": points_per_device.get(status.device, 0),
                **device_failures(status),
            }
        )
    return result


def device_failures(status: DeviceStatus) -> JsonDict:
    """Failed reads by reason and what the driver learned of the device (e.g. a Modbus meter's read limit)."""
    return {"failures": dict(status.failures), "driver_info": dict(status.info)}


# -- rules ----------------------------------------------------------------------------------------------------------


def rules(source: StatusSource | GatewayStatus) -> JsonDict:
    """The rule runtime's per-rule states (idle/pending/active/failed), the problems still current (``problems``),
    the recent ones that are over (``resolved_problems``: a rule that waited for its first inputs at start-up) and
    the outcome of the last reload (``reload``: accepted, or refused with each error's ``file:line:col``)."""
    status = snapshot(source).rules
    return {
        "loaded": status.loaded,
        "rules": [{**dataclasses.asdict(rule), "state": rule.state.lower()} for rule in status.rules],
        "problems": list(status.problems),
        "resolved_problems": list(status.resolved_problems),
        "reload": None if status.reload is None else status.reload.as_json(),
        "error": status.error,
    }


# -- uplinks and queues ---------------------------------------------------------------------------------------------


def uplinks(source: StatusSource | GatewayStatus) -> list[JsonDict]:
    return [dict(status) for status in snapshot(source).uplinks]


def queues(source: StatusSource | GatewayStatus, now_ns: int | None = None) -> JsonDict:
    """Bus subscriber queues (in batches) and the durable outbox (in samples, bytes and events)."""
    snap = snapshot(source)
    now_ns = snap.now_ns if now_ns is None else now_ns
    bus = [dataclasses.asdict(queue) for queue in snap.queues]
    outbox = snap.outbox
    if outbox is None:
        return {"bus": bus, "outbox": None}
    stats = outbox.stats
    return {
        "bus": bus,
        "outbox": {
            "writable": outbox.writable,
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
            "disk_bytes": dict(outbox.disk_usage),
            "disk_limit_bytes": outbox.telemetry_budget + outbox.event_budget + outbox.disk_margin,
        },
    }


# -- incentives and commands ----------------------------------------------------------------------------------------


def incentives_today(source: StatusSource | GatewayStatus) -> JsonDict:
    """Today's incentive records (in the gateway's time zone), or why there are none."""
    status = snapshot(source, records=True).incentives
    return {
        "enabled": status.enabled,
        "day": status.day,
        "records": [dict(record) for record in status.records],
        "error": status.error,
        "refused": dict(status.refused),
        "clock_steps": status.clock_steps,
    }


def recent_commands(source: StatusSource | GatewayStatus, limit: int = 20) -> list[JsonDict]:
    return [dict(entry) for entry in snapshot(source).commands[-limit:]][::-1]


# -- health ---------------------------------------------------------------------------------------------------------


def is_ready(source: StatusSource | GatewayStatus) -> bool:
    """What ``/readyz`` answers 200 for (``readiness``)."""
    return bool(readiness(source)["ready"])


def readiness(source: StatusSource | GatewayStatus) -> JsonDict:
    """``/readyz``: configuration loaded, outbox writable, at least one driver delivering (or about to)."""
    snap = snapshot(source)
    started = snap.started
    outbox = snap.outbox
    outbox_ok = outbox is not None and outbox.writable
    if outbox is None:
        outbox_detail = "outbox not open"
    elif outbox_ok:
        outbox_detail = "writable"
    else:
        outbox_detail = outbox.stats.last_error or "closed"
    statuses = snap.devices
    running = [s for s in statuses if s.state not in _DOWN_STATES]
    drivers_ok = snap.has_sources and bool(running)
    online = sum(1 for s in statuses if s.state is DeviceState.ONLINE)
    drivers_detail = f"{online} of {len(statuses)} devices online" if snap.has_sources else "no driver configured"
    checks: dict[str, JsonDict] = {
        "config": {"ok": started, "detail": "loaded, gateway started" if started else "starting"},
        "outbox": {"ok": outbox_ok, "detail": outbox_detail},
        "drivers": {"ok": drivers_ok, "detail": drivers_detail},
    }
    return {"ready": started and outbox_ok and drivers_ok, "checks": checks}


def alarms(source: StatusSource | GatewayStatus) -> list[JsonDict]:
    """What needs an operator's attention now, worst first: active and failed rules, offline devices, a failing
    outbox, dropped telemetry, uplinks in error."""
    snap = snapshot(source)
    found: list[JsonDict] = []
    for rule in snap.rules.rules:
        state = rule.state.lower()
        if state == "active":
            found.append({"severity": "alarm", "source": f"rule {rule.id}", "message": "condition active"})
        elif state == "failed":
            found.append({"severity": "error", "source": f"rule {rule.id}", "message": rule.last_error or "failed"})
    if snap.rules.error:
        found.append({"severity": "error", "source": "rules", "message": snap.rules.error})
    reload = snap.rules.reload
    if reload is not None and not reload.accepted:
        # the files on disk are not what runs: someone edited them and should hear why they were refused
        first = reload.diagnostics[0] if reload.diagnostics else None
        where = f": {first.file}:{first.line}:{first.col}: {first.message}" if first else ""
        found.append({"severity": "warning", "source": "rules", "message": reload.message + where})
    found.extend(
        {
            "severity": "error",
            "source": f"device {device.device}",
            "message": f"{device.state}: {device.last_error or 'no answer'}",
        }
        for device in snap.devices
        if device.state in _DOWN_STATES
    )
    found.extend(
        {"severity": "warning", "source": f"device {d.device}", "message": f"degraded: {d.last_error}"}
        for d in snap.devices
        if d.state is DeviceState.DEGRADED
    )
    outbox = snap.outbox
    if outbox is not None:
        stats = outbox.stats
        if not outbox.writable:
            found.append({"severity": "critical", "source": "outbox", "message": f"cannot write: {stats.last_error}"})
        if stats.event_store_full:
            found.append({"severity": "alarm", "source": "outbox", "message": "event store over its budget"})
        if stats.dropped_samples:
            found.append(
                {
                    "severity": "warning",
                    "source": "outbox",
                    "message": f"{stats.dropped_samples} telemetry samples dropped (store budget)",
                }
            )
    for uplink in snap.uplinks:
        state = str(uplink.get("state", "")).lower()
        if uplink.get("last_error") and state not in _HEALTHY_UPLINK_STATES:
            found.append(
                {"severity": "warning", "source": uplink["name"], "message": f"{state}: {uplink['last_error']}"}
            )
    order = {"critical": 0, "error": 1, "alarm": 2, "warning": 3}
    found.sort(key=lambda a: order.get(str(a["severity"]), 9))
    return found


def overview(source: StatusSource | GatewayStatus) -> JsonDict:
    """Everything at once, from one snapshot: the status page's data, ``/api/status`` and ``edge-gateway status``."""
    snap = snapshot(source, watch=True, records=True)  # it shows the points (someone looks) and the records
    now_ns = snap.now_ns
    device_view = devices(snap, now_ns)
    rule_view = rules(snap)
    uplink_view = uplinks(snap)
    queue_view = queues(snap, now_ns)
    return {
        "gateway": {
            "id": snap.gateway_id,
            "site": snap.site,
            "name": snap.name,
            "timezone": snap.timezone,
            "version": __version__,
            "uptime_s": _seconds_since(snap.started_ns, now_ns),
            "now_ms": now_ns // 1_000_000,
        },
        "readiness": readiness(snap),
        "alarms": alarms(snap),
        "devices": device_view,
        "points": points(snap, now_ns),
        "rules": rule_view,
        "uplinks": uplink_view,
        "queues": queue_view,
        "incentives": incentives_today(snap),
        "commands": recent_commands(snap),
    }
