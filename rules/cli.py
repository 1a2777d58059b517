"""``edge-gateway rules check`` and ``edge-gateway rules test``: the engineer's tools for rule files.

Owns argument parsing and printing only; loading is ``rules.loader``, replay is ``rules.replay``. Exit codes follow
``gateway.cli``: 0 ok, 1 the input was wrong (rule file, site or samples), 2 a usage error (a bad ``--tick``,
``--start`` or ``--until``), 3 a runtime failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from zoneinfo import ZoneInfo

from gateway.arguments import duration
from gateway.errors import ConfigError, Diagnostic
from gateway.registry import PointInfo
from rules.loader import load_rule_set
from rules.replay import ReplayReport, parse_time, read_samples_csv, replay
from rules.runtime import RuleRuntime


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rules = subparsers.add_parser("rules", help="check rule files, or replay recorded samples through them")
    sub = rules.add_subparsers(dest="rules_command", metavar="COMMAND", required=True)

    check = sub.add_parser("check", help="check rule files (names and types too when --site is given)")
    check.add_argument("files", nargs="+", type=Path, metavar="FILE")
    check.add_argument("--site", type=Path, help="site file: check point names and types against its devices")
    check.set_defaults(handler=run_check)

    test = sub.add_parser("test", help="replay recorded samples through rule files on a simulated clock")
    test.add_argument("files", nargs="+", type=Path, metavar="FILE")
    test.add_argument("--data", type=Path, required=True, help="samples CSV: time,point,value[,quality]")
    test.add_argument("--start", help="start of the replay; relative times in the CSV count from it (ISO 8601)")
    test.add_argument("--until", help="keep the clock running until this time (ISO 8601 or +duration)")
    test.add_argument("--site", type=Path, help="site file: point names, types and the time zone")
    test.add_argument("--tz", help="time zone of naive times and of the report (default: the site's, else UTC)")
    test.add_argument(
        "--tick", type=duration, default=1.0, help="simulated clock step between samples (default 1s; 10s, 1min)"
    )
    test.add_argument("-v", "--verbose", action="store_true", help="also print pending/reset, derived points")
    test.set_defaults(handler=run_test, usage=test)


def _site(path: Path | None) -> tuple[Mapping[str, PointInfo] | None, str]:
    if path is None:
        return None, "UTC"
    from gateway.config.site import load_site

    site = load_site(path)
    return site.registry, site.config.gateway.timezone


def run_check(args: argparse.Namespace) -> int:
    problems: list[Diagnostic] = []
    registry: Mapping[str, PointInfo] | None = None
    timezone, unchecked = "UTC", frozenset[str]()
    if args.site is not None:
        from gateway.config.site import SiteError, load_site

        try:
            site = load_site(args.site)
            registry, timezone = site.registry, site.config.gateway.timezone
        except SiteError as exc:
            # every error at once: the site's, and the rule files' against the devices that did load (a point of
            # a device that did not load is left unchecked: the device's own error stands for it)
            problems.extend(exc.diagnostics)
            registry, timezone = exc.partial.registry, exc.partial.timezone
            unchecked = exc.partial.unchecked_devices
        except ConfigError as exc:  # the site file cannot be read at all
            print(exc, file=sys.stderr)
            return 1
    try:
        rule_set = load_rule_set(args.files, registry, timezone=timezone, unchecked_devices=unchecked)
    except ConfigError as exc:
        problems.extend(exc.diagnostics)
    if problems:
        print(ConfigError(problems), file=sys.stderr)
        return 1
    names = "" if registry is not None else " (point names not checked: give --site)"
    print(
        f"ok: {len(rule_set.rules)} rules, {len(rule_set.derived) + len(rule_set.virtual)} derived points, "
        f"{len(rule_set.schedules)} schedules, {len(rule_set.allowlist.entries)} allowed writes "
        f"in {len(args.files)} file(s){names}"
    )
    return 0


def run_test(args: argparse.Namespace) -> int:
    try:
        registry, timezone = _site(args.site)
        zone_name = args.tz or timezone
        try:
            zone = ZoneInfo(zone_name)
        except (ValueError, KeyError):
            print(f"unknown time zone {zone_name!r}", file=sys.stderr)
            return 1
        tick_ns = round(args.tick * 1e9)
        try:
            start_ns = parse_time(args.start, zone, None) if args.start else None
        except ValueError as exc:
            args.usage.error(f"argument --start: {exc}")  # exits 2
        try:
            until_ns = parse_time(args.until, zone, start_ns) if args.until else None
        except ValueError as exc:
            args.usage.error(f"argument --until: {exc}")
        rule_set = load_rule_set(args.files, registry, timezone=zone_name)
        samples = read_samples_csv(args.data, zone=zone, start_ns=start_ns, registry=registry)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    runtime = RuleRuntime(rule_set, state=None)
    report = ReplayReport(
        zone=zone,
        verbose=args.verbose,
        virtual=frozenset(rule_set.virtual),
        rules=frozenset(r.id for r in rule_set.rules),
    )
    print(f"# replaying {len(samples)} samples through {len(rule_set.rules)} rules; times in {zone_name}")
    for now_ns, out in replay(runtime, samples, tick_ns=tick_ns, start_ns=start_ns, until_ns=until_ns):
        for line in report.lines(now_ns, out):
            print(line)
    print(report.summary())
    return 0
