"""The status page, rendered on the server from ``views.overview`` (no template engine, no build step, no CDN).

Owns the HTML only. Every dynamic string goes through ``escape`` (device names, rule errors and uplink messages
come from config files and the network). The page works with JavaScript disabled (a full snapshot, refreshed by
the browser's reload); ``static/status.js`` makes it live: values and sparklines every second, the other sections
every few seconds by fetching this same page and swapping the ``data-section`` elements.

Must never import aiohttp or read the gateway directly: it renders the dict it is given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from decimal import Decimal
from html import escape
from typing import Any

JsonDict = dict[str, Any]

#: incentive record columns shown when present (gateway/incentives/incentive-record.schema.json; dotted = nested)
_INCENTIVE_COLUMNS = (
    ("seq", "#"),
    ("kind", "Kind"),
    ("interval.local_start", "Interval"),
    ("day", "Day"),
    ("account", "Account"),
    ("status", "Status"),
    ("flags", "Flags"),
    ("energy_kwh", "kWh"),
    ("delta_kwh", "Below baseline kWh"),
    ("saving_kwh", "Saved kWh"),
    ("co2e_saved_kg", "kg CO2e saved"),
)


def format_value(value: Any) -> str:
    """The way a value is shown on the page and in the terminal (the JS ``fmt`` mirrors it)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def format_latency(milliseconds: float | None) -> str:
    if milliseconds is None:
        return "—"
    if milliseconds < 1:
        return f"{milliseconds * 1000:.0f} µs"
    return f"{milliseconds:.1f} ms"


#: how units written in device profiles are shown (the profiles keep ASCII names)
_UNIT_DISPLAY = {"degC": "°C", "degF": "°F", "m3": "m³", "m3/h": "m³/h", "ug/m3": "µg/m³"}


def format_unit(unit: str | None) -> str:
    return "" if unit is None else _UNIT_DISPLAY.get(unit, unit)


def format_reading(value: Any, digits: int = 6) -> str:
    """A value for a terminal line that scripts may read (``tail``, ``modbus read``): floats to ``digits``
    significant digits (a float32 register's ``230.10000610351562`` is ``230.1``), no thousands separator, and
    an exponent only outside 0.0001 to 10**15 (a wrong word order's ``1.37542e-36`` stays readable)."""
    if not isinstance(value, float) or not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if not 1e-4 <= abs(value) < 1e15:
        return f"{value:.{digits}g}"
    rounded = round(value, digits - 1 - math.floor(math.log10(abs(value))))
    text = format(Decimal(repr(rounded)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"  # pragma: no cover - the loop always returns


def _badge(text: str, tone: str) -> str:
    return f'<span class="badge {escape(tone)}">{escape(text)}</span>'


_STATE_TONES = {
    "online": "ok",
    "degraded": "warn",
    "unknown": "muted",
    "offline": "bad",
    "disabled": "warn",
    "idle": "muted",
    "pending": "warn",
    "active": "bad",
    "failed": "bad",
    "good": "ok",
    "uncertain": "warn",
    "bad": "bad",
    "critical": "bad",
    "error": "bad",
    "alarm": "warn",
    "warning": "warn",
}


def _tone(state: str) -> str:
    return _STATE_TONES.get(state, "muted")


def _table(headers: Iterable[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _section(name: str, title: str, body: str, *, note: str = "") -> str:
    extra = f'<span class="note">{escape(note)}</span>' if note else ""
    return f'<section class="panel" id="{name}" data-section="{name}"><h2>{escape(title)}{extra}</h2>{body}</section>'


# -- sections -------------------------------------------------------------------------------------------------------


def _summary(data: JsonDict) -> str:
    devices = data["devices"]
    online = sum(1 for d in devices if d["state"] == "online")
    # a point whose first value is not due yet (the building aggregate's first period) is neither good nor late
    points = [p for p in data["points"] if not p.get("awaiting")]
    not_due = len(data["points"]) - len(points)
    good = sum(1 for p in points if p["quality"] == "good")
    alarms = data["alarms"]
    outbox = data["queues"]["outbox"]
    backlog = "—" if outbox is None else f"{outbox['telemetry_samples']:,}"
    backlog_note = "" if outbox is None else format_bytes(sum(outbox["disk_bytes"].values())) + " on disk"
    uplinks = data["uplinks"]
    cards = [
        ("Devices online", f"{online}/{len(devices)}", "ok" if online == len(devices) and devices else "warn", ""),
        (
            "Points good",
            f"{good}/{len(points)}",
            "ok" if good == len(points) and points else "warn",
            f"{not_due} awaiting a first value" if not_due else "",
        ),
        ("Active alarms", str(len(alarms)), "bad" if alarms else "ok", ""),
        ("Outbox backlog", backlog, "muted", backlog_note),
        ("Uplinks", str(len(uplinks)), "muted", ", ".join(str(u["name"]) for u in uplinks) or "none configured"),
    ]
    body = "".join(
        f'<div class="card {tone}"><div class="label">{escape(label)}</div><div class="big">{escape(value)}</div>'
        f'<div class="sub">{escape(sub)}</div></div>'
        for label, value, tone, sub in cards
    )
    return f'<section class="cards" id="summary" data-section="summary">{body}</section>'


def _alarms(data: JsonDict) -> str:
    rows = [
        f"<tr><td>{_badge(a['severity'], _tone(a['severity']))}</td><td>{escape(a['source'])}</td>"
        f"<td>{escape(a['message'])}</td></tr>"
        for a in data["alarms"]
    ]
    return _section("alarms", "Alarms", _table(("Severity", "Source", "Message"), rows, "No active alarms."))


def _message_counters(data: JsonDict) -> str:
    """Message-driven sources (MQTT): per source (summed) and per device, what was rejected and why."""
    devices = [d for d in data["devices"] if d.get("counters")]
    if not devices:
        return ""
    totals: dict[str, JsonDict] = {}
    for d in devices:
        total = totals.setdefault(str(d["counters"].get("source", "")), {})
        for key, value in d["counters"].items():
            if isinstance(value, int):
                total[key] = total.get(key, 0) + value
            elif isinstance(value, dict):
                merged = total.setdefault(key, {})
                for reason, n in value.items():
                    merged[reason] = merged.get(reason, 0) + n

    def reasons(counts: JsonDict, key: str) -> str:
        by_reason = counts.get(f"{key}_by_reason") or {}
        detail = ", ".join(f"{escape(str(r))} {n:,}" for r, n in sorted(by_reason.items()))
        return f"{counts.get(key, 0):,}" + (f' <span class="dim">({detail})</span>' if detail else "")

    def row(name: str, c: JsonDict) -> str:
        return (
            f'<tr><td class="mono">{name}</td><td class="num">{c.get("messages", 0):,}</td>'
            f'<td class="num">{c.get("rejected", 0):,}</td><td>{reasons(c, "malformed")}</td>'
            f'<td>{reasons(c, "refused")}</td><td class="num">{c.get("unavailable", 0):,}</td>'
            f'<td class="num">{c.get("undeclared", 0):,}</td></tr>'
        )

    rows = [row(f"<b>{escape(name)}</b>", c) for name, c in sorted(totals.items())]
    rows += [row(escape(d["id"]), d["counters"]) for d in devices]
    headers = ("Source / device", "Messages", "Rejected", "Malformed", "Refused", "Went offline", "Undeclared fields")
    return _section("messages", "Sensor messages", _table(headers, rows, ""))


def _devices(data: JsonDict) -> str:
    rows = []
    for d in data["devices"]:
        latency = format_latency(d["mean_latency_ms"])
        rows.append(
            f'<tr><td class="mono">{escape(d["id"])}</td><td>{escape(d["driver"])}</td>'
            f'<td>{_badge(d["state"], _tone(d["state"]))} <span class="dim">{format_age(d["since_s"])}</span></td>'
            f'<td class="num">{d["points"]}</td><td class="num">{d["polls"]:,}</td>'
            f'<td class="num">{d["errors"]:,}</td><td class="num">{latency}</td>'
            f'<td class="num">{format_age(d["last_ok_age_s"])}</td>'
            f'<td class="err">{escape(d["last_error"] or "")}</td></tr>'
        )
    headers = ("Device", "Driver", "State", "Points", "Polls", "Errors", "Latency", "Last good", "Last error")
    return _section("devices", "Devices", _table(headers, rows, "No devices configured."))


def _points(data: JsonDict) -> str:
    by_device: dict[str, list[JsonDict]] = {}
    for point in data["points"]:
        by_device.setdefault(point["device"], []).append(point)
    state_of = {d["id"]: d["state"] for d in data["devices"]}
    cards = []
    for device, points in by_device.items():
        state = state_of.get(device, "derived")
        rows = []
        for p in points:
            quality = p["quality"] or "none"
            rows.append(
                f'<div class="pt q-{escape(quality)}" data-point="{escape(p["id"])}">'
                f'<span class="qdot" title="quality: {escape(quality)}"></span>'
                f'<span class="pname" title="{escape(p["id"])}">{escape(p["name"])}</span>'
                f'<span class="pval" data-field="value" title="{escape(format_value(p["value"]))}">'
                f"{escape(format_value(p['value']))}</span>"
                f'<span class="punit">{escape(format_unit(p["unit"]))}</span>'
                '<svg class="spark" viewBox="0 0 100 24" preserveAspectRatio="none" aria-hidden="true">'
                '<polyline points=""/></svg>'
                f'<span class="age" data-field="age"{_awaiting_title(p)}>{escape(_age_text(p))}</span></div>'
            )
        cards.append(
            f'<div class="device-card"><div class="device-head"><span class="mono">{escape(device)}</span>'
            f"{_badge(state, _tone(state))}</div>{''.join(rows)}</div>"
        )
    body = f'<div class="device-grid">{"".join(cards)}</div>' if cards else '<p class="empty">No points.</p>'
    return (
        f'<section class="panel" id="points" data-points="{len(data["points"])}"><h2>Live values'
        f'<span class="note" id="live-note">updating every second</span></h2>{body}</section>'
    )


def _age_text(point: JsonDict) -> str:
    """A point's age, or ``pending`` when its first value is not due yet (the JS ``ageText`` mirrors it)."""
    return "pending" if point.get("awaiting") and point["age_s"] is None else format_age(point["age_s"])


def _awaiting_title(point: JsonDict) -> str:
    return f' title="{escape(point["awaiting"])}"' if point.get("awaiting") else ""


def _rules(data: JsonDict) -> str:
    view = data["rules"]
    rows = []
    for rule in view["rules"]:
        since = rule.get("since_ns", rule.get("since"))
        since_text = ""
        if isinstance(since, int | float) and since > 0:
            # rule runtimes report ``since`` as Unix nanoseconds (or seconds): show it as an age either way
            since_s = since / 1e9 if since > 1e12 else since
            since_text = format_age(max(0.0, time.time() - since_s))
        waiting = rule.get("waiting_for") or ()
        error = rule.get("last_error") or rule.get("error") or ("waiting for " + ", ".join(waiting) if waiting else "")
        rows.append(
            f'<tr><td class="mono">{escape(str(rule["id"]))}</td><td>{_badge(rule["state"], _tone(rule["state"]))}</td>'
            f'<td class="num">{escape(since_text)}</td>'
            f'<td class="num">{escape(str(rule.get("evaluations", "")))}</td>'
            f'<td class="num">{escape(str(rule.get("failures", "")))}</td>'
            f'<td class="err">{escape(str(error))}</td></tr>'
        )
    empty = "No rule files loaded." if not view["loaded"] else "The rule files define no rules."
    body = _table(("Rule", "State", "For", "Evaluations", "Failures", "Error"), rows, empty)
    if view.get("error"):
        body += f'<p class="err">{escape(view["error"])}</p>'
    body += _reload(view.get("reload"))
    if view["problems"]:
        items = "".join(f"<li>{escape(p)}</li>" for p in view["problems"][-10:])
        body += f'<h3>Recent rule problems</h3><ul class="problems">{items}</ul>'
    resolved = view.get("resolved_problems") or []
    if resolved:
        # over by themselves (a rule waiting a second for its first inputs at start-up): information, not problems
        items = "".join(f"<li>{escape(p)}</li>" for p in resolved[-10:])
        body += (
            f'<details class="resolved"><summary>{len(resolved)} resolved since start</summary>'
            f'<ul class="resolved-list">{items}</ul></details>'
        )
    return _section("rules", "Rules", body)


def _reload(reload: JsonDict | None) -> str:
    """The last reload: a line when accepted, every error with its ``file:line:col`` when refused."""
    if not reload:
        return ""
    when = time.strftime("%H:%M:%S", time.localtime(reload["ts"] / 1e9))
    if reload["accepted"]:
        return f'<p class="reload-ok" id="rule-reload">{escape(when)} {escape(reload["message"])}</p>'
    items = "".join(
        f'<li><span class="mono">{escape(d["position"])}</span> {escape(d["message"])}</li>'
        for d in reload["diagnostics"]
    )
    return (
        f'<div class="reload-refused" id="rule-reload"><h3>{escape(when)} {escape(reload["message"])}</h3>'
        f'<ul class="diagnostics">{items}</ul></div>'
    )


def _uplinks(data: JsonDict) -> str:
    rows = []
    for u in data["uplinks"]:
        state = str(u.get("state", "unknown"))
        sent = _join_counts(u, ("sent_samples", "samples"), ("sent_events", "events"), ("sent", ""))
        backlog = _join_counts(u, ("backlog_samples", "samples"), ("backlog_events", "events"), ("backlog", ""))
        oldest = u.get("oldest_age_s")
        rows.append(
            f'<tr><td class="mono">{escape(str(u["name"]))}</td><td>{_badge(state, _uplink_tone(state))}</td>'
            f'<td class="num">{escape(str(backlog))}</td>'
            f'<td class="num">{escape(format_age(oldest) if isinstance(oldest, int | float) else "")}</td>'
            f'<td class="num">{escape(sent)}</td>'
            f'<td class="num">{escape(_join_counts(u, ("replayed_samples", ""), ("replayed", "")))}</td>'
            f'<td class="num">{escape(_join_counts(u, ("dropped_samples", ""), ("dropped", "")))}</td>'
            f'<td class="err">{escape(str(u.get("last_error") or ""))}</td></tr>'
        )
    headers = ("Uplink", "State", "Backlog", "Oldest", "Sent", "Replayed", "Dropped", "Last error")
    body = _table(headers, rows, "No uplinks configured: data stays in the local outbox.")
    queues = data["queues"]
    qrows = [
        f'<tr><td class="mono">bus → {escape(q["name"])}</td><td class="num">{q["depth"]}/{q["capacity"]} batches</td>'
        f'<td class="num">{q["delivered_samples"]:,}</td><td class="num">{q["dropped_samples"]:,}</td>'
        f"<td>{escape(q['policy'])}</td></tr>"
        for q in queues["bus"]
    ]
    outbox = queues["outbox"]
    if outbox is not None:
        state = "writable" if outbox["writable"] else f"NOT WRITABLE: {outbox['last_error']}"
        state += f", {format_bytes(sum(outbox['disk_bytes'].values()))} on disk"
        qrows.append(
            f'<tr><td class="mono">outbox</td><td class="num">{outbox["telemetry_samples"]:,} samples, '
            f"{outbox['events']:,} events ({format_bytes(outbox['telemetry_bytes'] + outbox['event_bytes'])})</td>"
            f'<td class="num">{outbox["appended_samples"]:,}</td><td class="num">{outbox["dropped_samples"]:,}</td>'
            f"<td>{escape(state)}</td></tr>"
        )
    body += "<h3>Queues</h3>" + _table(("Queue", "Depth", "Delivered", "Dropped", "Policy / state"), qrows, "")
    return _section("uplinks", "Uplinks and queues", body)


def _join_counts(status: JsonDict, *keys: tuple[str, str]) -> str:
    """``"1,200 samples, 3 events"`` from whichever of ``keys`` the uplink reports."""
    parts = []
    for key, label in keys:
        value = status.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{value:,}" + (f" {label}" if label else ""))
    return ", ".join(parts)


def _uplink_tone(state: str) -> str:
    lowered = state.lower()
    if lowered in ("connected", "ok", "up", "online", "sending", "running", "idle"):
        return "ok"
    if lowered in ("disconnected", "down", "error", "failed", "offline"):
        return "bad"
    return "warn"


def _incentives(data: JsonDict) -> str:
    view = data["incentives"]
    if not view["enabled"]:
        return _section("incentives", "Incentive records today", '<p class="empty">Incentives are not configured.</p>')
    records = view["records"]
    columns = [(key, title) for key, title in _INCENTIVE_COLUMNS if any(_dig(r, key) is not None for r in records)]
    if records and not columns:  # an unknown layout: show its first scalar fields rather than nothing
        columns = [(k, k) for k, v in records[0].items() if isinstance(v, str | int | float | bool)][:6]
    rows = [
        "<tr>"
        + "".join(f'<td class="mono">{escape(_short(format_value(_dig(record, key))))}</td>' for key, _ in columns)
        + "</tr>"
        for record in records[-50:]
    ]
    body = _table([title for _key, title in columns], rows, f"No records issued yet on {view['day']}.")
    refused = {name: count for name, count in (view.get("refused") or {}).items() if count}
    if refused:
        listed = ", ".join(f"{escape(name.replace('_', ' '))} {count}" for name, count in sorted(refused.items()))
        body += f'<p class="note-warn">Meter readings refused or ignored since start: {listed}</p>'
    if view.get("error"):
        body += f'<p class="err">{escape(view["error"])}</p>'
    return _section("incentives", "Incentive records today", body, note=f"{len(records)} records, {view['day']}")


def _dig(record: JsonDict, dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _short(text: str, limit: int = 25) -> str:
    """Pseudonyms are 37 characters of hex: the first few identify a row on screen (the API has them whole)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _commands(data: JsonDict) -> str:
    rows = [
        f'<tr><td class="num">{time.strftime("%H:%M:%S", time.localtime(c["ts"] / 1e9))}</td>'
        f'<td class="mono">{escape(c["point"])}</td><td class="num">{escape(format_value(c["value"]))}</td>'
        f"<td>{escape(c['origin'])}</td><td>{_badge(c['result'], 'ok' if c['result'] == 'ok' else 'bad')}</td>"
        f'<td class="err">{escape(c.get("detail") or "")}</td></tr>'
        for c in data["commands"]
    ]
    headers = ("Time", "Point", "Value", "Origin", "Result", "Detail")
    return _section("commands", "Recent writes", _table(headers, rows, "No writes yet."))


def _health(data: JsonDict) -> str:
    gw = data["gateway"]
    ready = data["readiness"]
    failing = [f"{name}: {check['detail']}" for name, check in ready["checks"].items() if not check["ok"]]
    badge = _badge("ready", "ok") if ready["ready"] else _badge("not ready", "bad")
    title = "; ".join(failing) if failing else "configuration loaded, outbox writable, drivers running"
    return (
        f'<div class="health" id="health" data-section="health" title="{escape(title)}">{badge}'
        f'<span class="dim">up {escape(format_age(gw["uptime_s"]))}</span></div>'
    )


def render(data: JsonDict) -> str:
    """The whole page for one ``views.overview`` snapshot."""
    gw = data["gateway"]
    name = gw["name"] or f"{gw['site']} / {gw['id']}"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(name)} · Edge Gateway</title>
<link rel="stylesheet" href="static/status.css">
</head>
<body>
<header class="top">
  <div class="brand"><svg viewBox="0 0 24 24" class="logo" aria-hidden="true"><path d="M12 2 3 7v10l9 5 9-5V7z"/></svg>
  <span>Edge Gateway</span></div>
  <div class="ident"><h1>{escape(name)}</h1>
  <span class="dim mono">{escape(gw["site"])}/{escape(gw["id"])} · v{escape(gw["version"])} ·
  {escape(gw["timezone"])}</span></div>
  {_health(data)}
</header>
<main>
{_summary(data)}
{_alarms(data)}
{_points(data)}
{_devices(data)}
{_message_counters(data)}
{_rules(data)}
{_uplinks(data)}
{_incentives(data)}
{_commands(data)}
</main>
<footer>Served by the gateway itself: works offline, no external resources.
JSON: <a href="api/status">/api/status</a> · <a href="api/points">/api/points</a> ·
<a href="api/devices">/api/devices</a> ·
<a href="api/rules">/api/rules</a> · <a href="api/uplinks">/api/uplinks</a> · <a href="metrics">/metrics</a> ·
<a href="readyz">/readyz</a></footer>
<script src="static/status.js" defer></script>
</body>
</html>
"""
