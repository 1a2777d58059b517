"""``edge-gateway status [--url URL]``: the status page's picture in a terminal, read from ``/api/status``.

Owns the terminal rendering only; the data comes from a running gateway over HTTP (standard library client, so the
command works on a box where the gateway runs as another user). Exit codes: 0 ready, 1 reachable but not ready,
3 unreachable or not a gateway; 2 a usage error (argparse), 130 Ctrl-C (``gateway.cli``).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

import orjson

from gateway.arguments import duration, gateway_url
from gateway.http.page import format_age, format_bytes, format_latency, format_unit, format_value
from gateway.rule_report import clock

JsonDict = dict[str, Any]


def fetch_json(url: str, path: str, *, token: str | None = None, timeout: float = 5.0) -> Any:
    """GET ``{url}{path}`` as JSON, with the access token when given. Raises OSError (unreachable, HTTP error:
    ``urllib.error.HTTPError``) or ValueError (not JSON)."""
    request = urllib.request.Request(url.rstrip("/") + path)  # noqa: S310 (operator-given URL)
    if token:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"status:{token}".encode()).decode())
    with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
        return orjson.loads(resp.read())


def fetch_status(url: str, *, token: str | None = None, timeout: float = 5.0) -> JsonDict:
    """GET ``{url}/api/status``. Raises OSError (unreachable, HTTP error) or ValueError (not a gateway's JSON)."""
    data = fetch_json(url, "/api/status", token=token, timeout=timeout)
    if not isinstance(data, dict) or "gateway" not in data or "points" not in data:
        raise ValueError("the answer is not an edge-gateway status document")
    return data


def _table(rows: list[list[str]], out: TextIO, indent: str = "  ") -> None:
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(indent + line.rstrip(), file=out)


def render(data: JsonDict, out: TextIO, *, all_points: bool = True) -> None:
    """Print the same sections as the status page, in the same order (``all_points=False``: ``--problems``)."""
    _render_header(data, out)
    _render_alarms(data, out)
    _render_devices(data, out)
    _render_points(data, out, all_points=all_points)
    _render_rules(data, out, all_points=all_points)
    _render_uplinks(data, out)
    _render_incentives(data, out)


def _render_header(data: JsonDict, out: TextIO) -> None:
    gw = data["gateway"]
    ready = data["readiness"]
    name = gw["name"] or f"{gw['site']}/{gw['id']}"
    state = "READY" if ready["ready"] else "NOT READY"
    print(f"{name}  ({gw['site']}/{gw['id']}, v{gw['version']})  {state}, up {format_age(gw['uptime_s'])}", file=out)
    for check, result in ready["checks"].items():
        if not result["ok"]:
            print(f"  ! {check}: {result['detail']}", file=out)


def _render_alarms(data: JsonDict, out: TextIO) -> None:
    print(f"\nAlarms ({len(data['alarms'])})", file=out)
    if data["alarms"]:
        _table([[a["severity"].upper(), a["source"], a["message"]] for a in data["alarms"]], out)
    else:
        print("  none", file=out)


def _render_devices(data: JsonDict, out: TextIO) -> None:
    print(f"\nDevices ({len(data['devices'])})", file=out)
    _table(
        [["device", "driver", "state", "polls", "errors", "latency", "last good", "last error"]]
        + [
            [
                d["id"],
                d["driver"],
                d["state"],
                str(d["polls"]),
                str(d["errors"]),
                format_latency(d["mean_latency_ms"]),
                format_age(d["last_ok_age_s"]),
                d["last_error"] or "",
            ]
            for d in data["devices"]
        ],
        out,
    )


def _render_points(data: JsonDict, out: TextIO, *, all_points: bool) -> None:
    points = data["points"]
    if not all_points:  # a point whose first value is not due yet (the building aggregate) is not a problem
        points = [p for p in points if p["quality"] != "good" and not p.get("awaiting")]
    print(f"\nPoints ({len(data['points'])}{'' if all_points else ', not good only'})", file=out)
    if not points:
        print("  every point good" if data["points"] else "  none", file=out)
        return
    _table(
        [["point", "value", "unit", "quality", "age"]]
        + [
            [
                p["id"],
                format_value(p["value"]),
                format_unit(p["unit"]),
                p["quality"] or "-",
                p["awaiting"] if p.get("awaiting") and p["age_s"] is None else format_age(p["age_s"]),
            ]
            for p in points
        ],
        out,
    )


def _render_rules(data: JsonDict, out: TextIO, *, all_points: bool) -> None:
    rules = data["rules"]
    print(f"\nRules ({len(rules['rules'])})", file=out)
    if not rules["loaded"]:
        print("  no rule files loaded", file=out)
    _table([[str(r["id"]), r["state"], str(r.get("last_error") or r.get("error") or "")] for r in rules["rules"]], out)
    if rules.get("error"):
        print(f"  ! {rules['error']}", file=out)
    reload = rules.get("reload")
    if reload and (not reload["accepted"] or all_points):
        # a refused reload is a problem until a reload succeeds; an accepted one is only news
        mark = "" if reload["accepted"] else "! "
        print(f"  {mark}{clock(reload['ts'])} {reload['message']}", file=out)
        for diagnostic in reload["diagnostics"]:
            print(f"    {diagnostic['position']}: {diagnostic['message']}", file=out)
    if rules["problems"]:
        print("  recent rule problems:", file=out)  # the page's heading
        for problem in rules["problems"][-10:]:
            print(f"    {problem}", file=out)
    resolved = rules.get("resolved_problems") or []
    if resolved and all_points:
        print(f"  {len(resolved)} resolved since start (the last: {resolved[-1]})", file=out)


def _render_uplinks(data: JsonDict, out: TextIO) -> None:
    print(f"\nUplinks ({len(data['uplinks'])})", file=out)
    if not data["uplinks"]:
        print("  none configured: data stays in the local outbox", file=out)
    _table(
        [
            [
                str(u["name"]),
                str(u.get("state", "?")),
                f"backlog {u.get('backlog_samples', u.get('backlog', '?'))} samples,"
                f" {u.get('backlog_events', 0)} events",
                f"sent {u.get('sent_samples', u.get('sent', '?'))}",
                str(u.get("last_error") or ""),
            ]
            for u in data["uplinks"]
        ],
        out,
    )
    outbox = data["queues"]["outbox"]
    if outbox is not None:
        writable = "writable" if outbox["writable"] else f"NOT WRITABLE ({outbox['last_error']})"
        print(
            f"  outbox: {outbox['telemetry_samples']} samples, {outbox['events']} events, "
            f"{format_bytes(outbox['telemetry_bytes'] + outbox['event_bytes'])}, {writable}",
            file=out,
        )


def _render_incentives(data: JsonDict, out: TextIO) -> None:
    incentives = data["incentives"]
    if not incentives["enabled"]:
        return
    print(f"\nIncentive records on {incentives['day']}: {len(incentives['records'])}", file=out)
    refused = {name: count for name, count in (incentives.get("refused") or {}).items() if count}
    if refused:
        listed = ", ".join(f"{name.replace('_', ' ')} {count}" for name, count in sorted(refused.items()))
        print(f"  meter readings refused or ignored: {listed}", file=out)
    if incentives.get("error"):
        print(f"  ! {incentives['error']}", file=out)


def read_token(token_file: str | None) -> str | None:
    """The access token: the first line of ``token_file``, else ``$EDGE_GATEWAY_TOKEN``. Raises OSError."""
    if token_file:
        lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        return lines[0].strip() if lines else None
    return os.environ.get("EDGE_GATEWAY_TOKEN") or None


#: what ``status`` and ``tail`` add to an HTTP 401
UNAUTHORISED_HINT = " (give the access token with --token-file or $EDGE_GATEWAY_TOKEN)"


def cmd_status(args: argparse.Namespace) -> int:
    try:
        token = read_token(args.token_file)
    except OSError as exc:
        print(f"cannot read token file {args.token_file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        data = fetch_status(args.url, token=token, timeout=args.timeout)
    except urllib.error.HTTPError as exc:
        hint = UNAUTHORISED_HINT if exc.code == 401 else ""
        print(f"{args.url}: HTTP {exc.code} {exc.reason}{hint}", file=sys.stderr)
        return 3
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"cannot read the gateway's status at {args.url}: {reason} (is it running?)", file=sys.stderr)
        return 3
    render(data, sys.stdout, all_points=not args.problems)
    return 0 if data["readiness"]["ready"] else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser(
        "status",
        help="print a running gateway's status (devices, points, alarms, rules, uplinks)",
        description="Exit code: 0 ready, 1 running but not ready, 3 unreachable.",
    )
    status.add_argument(
        "--url",
        type=gateway_url,
        default="http://127.0.0.1:8080",
        help="the gateway's status address (http:// may be left out)",
    )
    status.add_argument("--token-file", help="file holding the access token (default: $EDGE_GATEWAY_TOKEN)")
    status.add_argument("--timeout", type=duration, default=5.0, help="how long to wait for an answer (5, 500ms, 1min)")
    status.add_argument(
        "--problems",
        action="store_true",
        help="list only what needs attention (points not good, open rule problems, a refused rule reload)",
    )
    status.set_defaults(handler=cmd_status)
