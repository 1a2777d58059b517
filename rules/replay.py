"""Replaying recorded samples through a rule set on a simulated clock (``edge-gateway rules test``).

Owns the samples CSV format, the replay loop and the one-line-per-action report. The CSV has a header and one
sample per row::

    time,point,value[,quality]                  # the first column may also be called ts
    2026-03-02T08:00:00,zone3.co2,1180          # absolute (naive times are in the site's time zone)
    +5min,zone3.co2,1210                        # or relative to --start: seconds or a duration
    +6min,zone3.co2,,bad                        # empty value (or quality bad): the point is missing

Rows may come in any order; rows with the same time form one batch. The clock ticks every ``tick`` (1 s by
default) between samples, so ``for:`` timers, schedules and windows move exactly as they would live.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from gateway.config.types import parse_duration
from gateway.errors import ConfigError, Diagnostic
from gateway.model import Quality, Sample, is_point_id
from gateway.registry import PointInfo
from rules.runtime import Outputs, RuleRuntime

_QUALITIES = {"good": Quality.GOOD, "uncertain": Quality.UNCERTAIN, "bad": Quality.BAD, "": Quality.GOOD}
_TRUE = {"true", "1", "on"}
_FALSE = {"false", "0", "off"}


class NeedsStart(ValueError):
    """A relative time without ``--start``: said once for the whole file, not once per row."""


def parse_time(text: str, zone: ZoneInfo, start_ns: int | None) -> int:
    """An ISO time (naive means ``zone``) or a time relative to ``start_ns`` (``+5min``, ``90``) -> Unix ns."""
    text = text.strip()
    relative = text.removeprefix("+")
    if relative and (relative[0].isdigit()) and ("-" not in relative and ":" not in relative):
        if start_ns is None:
            raise NeedsStart(f"relative time {text!r} needs --start (like --start 2026-03-02T08:00)")
        return start_ns + round(parse_duration(relative) * 1e9)
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"invalid time {text!r}: use ISO 8601 (2026-03-02T08:00:00) or +5min") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return round(moment.timestamp() * 1e9)


def _parse_value(text: str, info: PointInfo | None) -> Any:
    kind = info.kind if info is not None else None
    lowered = text.strip().lower()
    if kind == "bool" or (kind is None and lowered in ("true", "false")):
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"{text!r} is not true/false")
    if kind == "str":
        return text
    try:
        number = float(text)
    except ValueError:
        if kind is None:
            return text
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{text!r} is not a finite number")
    return int(number) if kind == "int" and number.is_integer() else number


def read_samples_csv(
    path: Path, *, zone: ZoneInfo, start_ns: int | None, registry: Mapping[str, PointInfo] | None
) -> list[Sample]:
    """Read a samples CSV (see the module docstring); raise ``ConfigError`` naming each bad row."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Diagnostic(name, 0, 0, f"cannot read samples: {exc}")]) from exc
    lines = text.splitlines()
    rows = [(number, line) for number, line in enumerate(lines, 1) if line.strip() and not line.startswith("#")]
    if not rows:
        raise ConfigError([Diagnostic(name, 0, 0, "no samples")])
    header_no, header_line = rows[0]
    header = [h.strip() for h in next(csv.reader([header_line]))]
    if (
        header[:1] not in (["time"], ["ts"])
        or header[1:3] != ["point", "value"]
        or len(header) > 4
        or header[3:] not in ([], ["quality"])
    ):
        raise ConfigError(
            [
                Diagnostic(
                    name, header_no, 1, "the header must be time,point,value[,quality] (or ts for time)", header_line
                )
            ]
        )
    samples: list[Sample] = []
    errors: list[Diagnostic] = []
    needs_start: int | None = None  # index in errors of the one "needs --start" diagnostic
    relative_rows = 0
    for number, line in rows[1:]:
        fields = next(csv.reader([line]))
        try:
            if len(fields) not in (3, 4):
                raise ValueError(f"expected 3 or 4 fields, got {len(fields)}")
            ts = parse_time(fields[0], zone, start_ns)
            point = fields[1].strip()
            if not is_point_id(point):
                raise ValueError(f"{point!r} is not a point id (device.point)")
            if registry is not None and point not in registry:
                raise ValueError(f"unknown point {point!r}")
            quality_text = fields[3].strip().lower() if len(fields) == 4 else ""
            if quality_text not in _QUALITIES:
                raise ValueError(f"quality must be good, uncertain or bad, not {quality_text!r}")
            quality = _QUALITIES[quality_text]
            raw = fields[2]
            if quality == Quality.BAD or not raw.strip():
                samples.append(Sample(point, None, ts, Quality.BAD))
            else:
                info = registry.get(point) if registry is not None else None
                samples.append(Sample(point, _parse_value(raw, info), ts, quality))
        except NeedsStart as exc:
            relative_rows += 1
            if needs_start is None:
                needs_start = len(errors)
                errors.append(Diagnostic(name, number, 1, str(exc), line))
        except ValueError as exc:
            errors.append(Diagnostic(name, number, 1, str(exc), line))
    if needs_start is not None and relative_rows > 1:
        first = errors[needs_start]
        rows_text = "1 more row" if relative_rows == 2 else f"{relative_rows - 1} more rows"
        more = f"{first.message}; so do {rows_text} with relative times"
        errors[needs_start] = Diagnostic(first.file, first.line, first.col, more, first.source_line)
    if errors:
        raise ConfigError(errors)
    samples.sort(key=lambda s: s.ts)  # stable: rows of one time keep their file order
    return samples


def replay(
    runtime: RuleRuntime,
    samples: list[Sample],
    *,
    tick_ns: int,
    start_ns: int | None = None,
    until_ns: int | None = None,
) -> Iterator[tuple[int, Outputs]]:
    """Feed ``samples`` batch by batch, ticking every ``tick_ns`` in between; yield each step's outputs.

    The clock runs from ``start_ns`` (default: the first sample) to ``until_ns`` (default: the last sample)."""
    if not samples:
        return
    now = min(samples[0].ts, start_ns) if start_ns is not None else samples[0].ts
    end = max(samples[-1].ts, until_ns or 0)
    index = 0
    while now <= end:
        batch: list[Sample] = []
        while index < len(samples) and samples[index].ts <= now:
            batch.append(samples[index])
            index += 1
        if batch:
            yield now, runtime.process(batch, now)
        yield now, runtime.tick(now)
        next_sample = samples[index].ts if index < len(samples) else None
        next_tick = now + tick_ns
        now = min(next_tick, next_sample) if next_sample is not None else next_tick


@dataclass
class ReplayReport:
    """Formats outputs as ``time  KIND  details`` lines and counts them."""

    zone: ZoneInfo
    verbose: bool = False
    fired: int = 0
    cleared: int = 0
    writes: int = 0
    publishes: int = 0
    events: int = 0
    failures: int = 0
    #: virtual points (their SET lines are always shown) and rule ids (their problems are always shown)
    virtual: frozenset[str] = frozenset()
    rules: frozenset[str] = frozenset()

    def time(self, ts_ns: int) -> str:
        return dt.datetime.fromtimestamp(ts_ns / 1e9, self.zone).strftime("%Y-%m-%d %H:%M:%S")

    def lines(self, now_ns: int, out: Outputs) -> Iterator[str]:
        when = self.time(now_ns)
        for t in out.transitions:
            if t.new in ("active", t.old):
                self.fired += 1
                yield f"{when}  FIRE     {t.rule} ({t.reason})"
            elif t.old == "active" and t.new == "idle":
                self.cleared += 1
                yield f"{when}  CLEAR    {t.rule} ({t.reason})"
            elif t.new == "failed":
                self.failures += 1
                yield f"{when}  FAILED   {t.rule}: {t.reason}"
            elif self.verbose:
                yield f"{when}  {t.new.upper():<8} {t.rule} ({t.reason})"
        for command in out.commands:
            self.writes += 1
            slot = "" if command.priority is None else f" (priority {command.priority})"
            if command.relinquish:
                yield f"{when}  RELINQ   {command.point}{slot} [{command.origin}]"
            else:
                yield f"{when}  WRITE    {command.point} = {_show(command.value)}{slot} [{command.origin}]"
        for topic, payload in out.publishes:
            self.publishes += 1
            yield f"{when}  PUBLISH  {topic} {payload.decode()}"
        for event in out.events:
            self.events += 1
            if event.type == "alarm":
                body = event.body
                yield f"{when}  ALARM    {body['state']} {body['severity']} {event.subject}: {body['message']}"
            else:
                yield f"{when}  EVENT    {event.type} {event.subject}: {event.body.get('message')}"
        for sample in out.samples:
            if sample.point in self.virtual:
                yield f"{when}  SET      {sample.point} = {_show(sample.value)}"
            elif self.verbose:
                yield f"{when}  POINT    {sample.point} = {_show(sample.value)} ({sample.quality.name.lower()})"
        for problem in out.problems:
            if problem.subject in self.rules or self.verbose:
                yield f"{when}  PROBLEM  {problem.subject}: {problem.message}"

    def summary(self) -> str:
        return (
            f"# {self.fired} firings, {self.cleared} clearings, {self.writes} writes, {self.publishes} publishes, "
            f"{self.events} events, {self.failures} failures"
        )


def _show(value: Any) -> str:
    if value is None:
        return "(missing)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}" if not value.is_integer() else str(int(value))
    return str(value)
