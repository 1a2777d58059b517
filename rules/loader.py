"""Rule files -> a checked, compiled ``RuleSet``, or a ``ConfigError`` listing every problem with its position.

Owns: reading rule files (strict YAML with positions), merging several files, resolving derived points in
dependency order (cycles are errors), compiling every expression against the point registry, checking writes
against the allowlist and the registry's bounds, and the ``Allowlist`` itself.

Expression errors are positioned inside the YAML scalar they came from: ``demo.yaml:14:23`` points at the unknown
name, not at the start of the line. Imports no runtime or I/O code beyond reading the files.

Personal data (``PointInfo.personal``, docs/privacy.md): rules may read it, but what they make of it stays personal.
A derived point computed from a personal point is personal; a virtual point set from one must be declared
``personal: true``; a ``publish``, ``alarm`` or ``event`` whose payload reads one is refused at load, because those
go to the city platform as they are. Reads are followed through ``let`` names and other derived points.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.config.source import Loc, SourceMap, did_you_mean, load_yaml, validate
from gateway.errors import ConfigError, Diagnostic, WriteRejected
from gateway.model import Command, Value, is_point_id
from gateway.registry import PointInfo, ValueKind
from rules.config import (
    RULE_ID_RE,
    Action,
    AllowEntry,
    DerivedPointConfig,
    RuleConfig,
    RuleFileConfig,
    ScheduleConfig,
    SetAction,
    WriteAction,
)
from rules.expr import FUNCTIONS, CompiledExpr, Evaluator, ExprError, Kind, compile_expr, kind_of_value
from rules.schedule import Schedule

_REGISTRY_KINDS: dict[str, Kind] = {"float": "num", "int": "num", "bool": "bool", "str": "str"}
#: the measurement of every point rules make: a registry point without it (and not physical) is the gateway's own
#: (the building aggregate), which a rule may not redefine either
RULE_MEASUREMENT = "derived"
_POINT_KINDS: dict[Kind, ValueKind] = {"num": "float", "bool": "bool", "str": "str", "any": "float"}


# -- compiled forms ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DerivedPoint:
    """A point computed from others: an expression or a window aggregate. ``order`` is its topological rank."""

    id: str
    order: int
    inputs: tuple[str, ...]
    info: PointInfo
    expr: Evaluator | None = None
    #: (function, source point) of a window aggregate
    aggregate: tuple[str, str] | None = None
    window_ns: int = 0
    per_s: float = 1.0
    #: equal definitions carry their window and value across a reload
    definition: str = ""


@dataclass(frozen=True, slots=True)
class VirtualPoint:
    """A point only rules write (``set:``)."""

    id: str
    kind: Kind
    initial: Value | None
    info: PointInfo


# One class per action kind, each holding only what that kind needs; ``index`` is the action's position in its list
# (it makes an event's id). The runtime dispatches on the class.


@dataclass(frozen=True, slots=True)
class CompiledWrite:
    """``write:``: a command to a device point, checked against the allowlist again at run time. ``value`` None is
    a relinquish (``write: {point, relinquish: true}``)."""

    index: int
    point: str
    value: Evaluator | None


@dataclass(frozen=True, slots=True)
class CompiledSet:
    """``set:``: a new value of a virtual point, fed back to the rules and derived points that read it."""

    index: int
    point: str
    value: Evaluator


@dataclass(frozen=True, slots=True)
class CompiledPublish:
    """``publish:``: a JSON payload to a topic under the platform prefix."""

    index: int
    topic: str
    payload: Evaluator


@dataclass(frozen=True, slots=True)
class CompiledAlarm:
    """``alarm:``: raised when the rule fires, cleared (same id + ``/cleared``) when it clears."""

    index: int
    severity: str
    message: str
    subject: str | None
    data: Evaluator


@dataclass(frozen=True, slots=True)
class CompiledEvent:
    """``event:``: a one-off event of the engineer's type."""

    index: int
    event_type: str
    message: str | None
    subject: str | None
    data: Evaluator


CompiledAction = CompiledWrite | CompiledSet | CompiledPublish | CompiledAlarm | CompiledEvent


@dataclass(frozen=True, slots=True)
class CompiledRule:
    id: str
    index: int
    file: str
    line: int
    when: Evaluator | None
    clear_when: Evaluator | None
    hold_ns: int
    cooldown_ns: int
    every_ns: int
    schedule: Schedule | None
    lets: tuple[tuple[str, Evaluator], ...]
    then: tuple[CompiledAction, ...]
    on_clear: tuple[CompiledAction, ...]
    #: every point the rule reads: it evaluates only when all of them have a value
    inputs: tuple[str, ...]
    #: identifies the condition; persisted state of a rule whose condition changed is not resumed
    fingerprint: str
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class AllowedWrite:
    point: str
    kind: ValueKind
    min: float | None
    max: float | None
    values: tuple[Value, ...] | None
    #: the BACnet priority slot of this point's writes; None leaves it to the driver (the profile's priority)
    priority: int | None = None
    #: whether a relinquish (release of that slot) is allowed
    relinquish: bool = False


class Allowlist:
    """The writes rules and the city platform may make. ``check(command)`` raises ``WriteRejected``."""

    def __init__(self, entries: Mapping[str, AllowedWrite]) -> None:
        self.entries = dict(entries)

    def __contains__(self, point: object) -> bool:
        return point in self.entries

    def check(self, command: Command) -> Command:
        """The command as it goes to the driver, stamped with its entry's priority; raises ``WriteRejected``.

        The priority comes only from the entry, never from the sender: whoever may write a point writes it in the
        one slot its entry names, and a relinquish releases that same slot.
        """
        entry = self.entries.get(command.point)
        if entry is None:
            raise WriteRejected(f"write to {command.point} refused: not in the rules' allow list")
        if command.relinquish:
            if not entry.relinquish:
                raise WriteRejected(
                    f"relinquish of {command.point} refused: its allow entry does not permit it (add relinquish: true)"
                )
            return command._replace(value=None, priority=entry.priority)
        value = command.value
        if value is None:
            raise WriteRejected(f"write to {command.point} refused: no value")
        if entry.kind in ("float", "int"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise WriteRejected(f"write to {command.point} refused: {value!r} is not a number")
            if not math.isfinite(value):
                raise WriteRejected(f"write to {command.point} refused: {value!r} is not a finite number")
            if entry.min is not None and value < entry.min:
                raise WriteRejected(f"write to {command.point} refused: {value} is below the minimum {entry.min:g}")
            if entry.max is not None and value > entry.max:
                raise WriteRejected(f"write to {command.point} refused: {value} is above the maximum {entry.max:g}")
        elif entry.kind == "bool" and not isinstance(value, bool):
            raise WriteRejected(f"write to {command.point} refused: {value!r} is not true/false")
        elif entry.kind == "str" and not isinstance(value, str):
            raise WriteRejected(f"write to {command.point} refused: {value!r} is not text")
        if entry.values is not None and value not in entry.values:
            raise WriteRejected(f"write to {command.point} refused: {value!r} is not one of {list(entry.values)}")
        return command._replace(priority=entry.priority)


@dataclass(frozen=True)
class RuleSet:
    """Everything the engine needs, checked and compiled."""

    derived: tuple[DerivedPoint, ...]
    virtual: Mapping[str, VirtualPoint]
    rules: tuple[CompiledRule, ...]
    schedules: Mapping[str, Schedule]
    allowlist: Allowlist
    files: tuple[Path, ...] = field(default=())
    #: default zone of schedules without ``tz``; a reload keeps it unless told otherwise
    timezone: str = "UTC"


# -- positions --------------------------------------------------------------------------------------------------


def expr_diagnostic(smap: SourceMap, loc: Loc, exc: ExprError, skip: int = 0) -> Diagnostic:
    """Position an expression error inside its YAML scalar (``skip`` characters of the value precede the
    expression, e.g. the ``=`` of an action value)."""
    if loc not in smap.values:
        return smap.diagnostic(loc, exc.message)
    line, col = smap.values[loc]
    text = smap.lines[line - 1] if 0 < line <= len(smap.lines) else ""
    first = text[col - 1] if 0 < col <= len(text) else ""
    if first in "|>":  # block scalar: the expression starts on the next line, indented
        target = line + exc.line
        body = smap.lines[target - 1] if target <= len(smap.lines) else ""
        indent = len(body) - len(body.lstrip())
        return smap.at(target, indent + exc.col + (skip if exc.line == 1 else 0), exc.message)
    if first in "\"'":
        col += 1
    if exc.line == 1:
        return smap.at(line, col + skip + exc.col - 1, exc.message)
    target = line + exc.line - 1
    body = smap.lines[target - 1] if target <= len(smap.lines) else ""
    indent = len(body) - len(body.lstrip())
    return smap.at(target, indent + exc.col, exc.message)


# -- scope: what names an expression may use ---------------------------------------------------------------------


class _CycleError(Exception):
    def __init__(self, chain: list[str]) -> None:
        super().__init__(" -> ".join(chain))
        self.chain = chain


class _Scope(Mapping[str, Kind]):
    """Point id -> kind, resolving derived points on first use (so definition order in the file is free)."""

    def __init__(self, builder: _Builder) -> None:
        self.builder = builder

    def __getitem__(self, name: str) -> Kind:
        return self.builder.kind_of(name)

    def __iter__(self) -> Iterator[str]:
        yield from self.builder.registry
        yield from (p for p in self.builder.point_configs if p not in self.builder.registry)

    def __len__(self) -> int:
        return len(self.builder.registry) + len(self.builder.point_configs)


@dataclass
class _PointSource:
    config: DerivedPointConfig
    smap: SourceMap
    loc: Loc


@dataclass
class _RuleSource:
    config: RuleConfig
    smap: SourceMap
    loc: Loc


class _Builder:
    def __init__(self, registry: Mapping[str, PointInfo] | None, timezone: str) -> None:
        #: no registry (``rules check`` without ``--site``): any well-formed point id is accepted, of any type
        self.open_world = registry is None
        self.registry: Mapping[str, PointInfo] = registry if registry is not None else {}
        self.timezone = timezone
        self.errors: list[Diagnostic] = []
        self.point_configs: dict[str, _PointSource] = {}
        self.schedule_configs: dict[str, tuple[ScheduleConfig, SourceMap, Loc]] = {}
        self.allow_configs: dict[str, tuple[AllowEntry, SourceMap, Loc]] = {}
        self.rule_configs: list[_RuleSource] = []
        #: names whose definition failed validation (already reported): using them is not a second error
        self.broken_points = _Names()
        self.broken_schedules = _Names()
        self.broken_allow = _Names()
        self.unchecked_devices: frozenset[str] = frozenset()
        self.kinds: dict[str, Kind] = {}
        self.visiting: list[str] = []
        self.derived: dict[str, tuple[DerivedPoint, frozenset[str]]] = {}
        self.virtual: dict[str, VirtualPoint] = {}
        #: per rule being compiled: let name -> the points it reads (through earlier lets too)
        self.let_points: dict[str, frozenset[str]] = {}
        self.scope = _Scope(self)

    # -- reading --------------------------------------------------------------------------------------------

    def add_file(self, path: Path) -> None:
        try:
            # a duplicate key is reported and the first value kept, so the file's other problems are found too
            data, smap = load_yaml(path, recovered=self.errors)
            if not isinstance(data, dict):
                raise ConfigError([smap.diagnostic((), "a rule file is a mapping with version, points, rules...")])
        except ConfigError as exc:
            self.errors.extend(exc.diagnostics)
            return
        try:
            parts = _FileParts.of(validate(RuleFileConfig, data, smap))
        except ConfigError as exc:
            # every problem pydantic found is reported; what did validate is still checked (names, expressions,
            # bounds), with the names of what did not kept as placeholders so nothing else is blamed for them
            self.errors.extend(exc.diagnostics)
            parts = _salvage(data)
        self.broken_points.update(parts.broken_points)
        self.broken_schedules.update(parts.broken_schedules)
        self.broken_allow.update(parts.broken_allow)
        for point, point_config in parts.points:
            if point in self.point_configs:
                message = f"derived point {point!r} defined twice"
                self.errors.append(smap.diagnostic(("points", point), message, key=True))
                continue
            known = self.registry.get(point)
            if known is not None and (known.physical or known.measurement != RULE_MEASUREMENT):
                what = "a device point" if known.physical else "the gateway's own point"
                self.errors.append(
                    smap.diagnostic(("points", point), f"{point!r} is {what}; pick another name", key=True)
                )
                continue
            self.point_configs[point] = _PointSource(point_config, smap, ("points", point))
        for name, schedule in parts.schedules:
            if name in self.schedule_configs:
                self.errors.append(smap.diagnostic(("schedules", name), f"schedule {name!r} defined twice", key=True))
                continue
            self.schedule_configs[name] = (schedule, smap, ("schedules", name))
        for group, index, entry in parts.allow:
            loc: Loc = ("allow", group, index)
            if entry.point in self.allow_configs:
                self.errors.append(smap.diagnostic((*loc, "point"), f"{entry.point} is allowed twice"))
                continue
            self.allow_configs[entry.point] = (entry, smap, loc)
        seen = {r.config.id for r in self.rule_configs}
        for index, rule in parts.rules:
            if rule.id and rule.id in seen:
                self.errors.append(smap.diagnostic(("rules", index, "id"), f"rule id {rule.id!r} used twice"))
                continue
            seen.add(rule.id)
            self.rule_configs.append(_RuleSource(rule, smap, ("rules", index)))

    # -- names and derived points --------------------------------------------------------------------------

    def kind_of(self, name: str) -> Kind:
        if name in self.kinds:
            return self.kinds[name]
        source = self.point_configs.get(name)
        if source is None:
            unchecked = name in self.broken_points or name.partition(".")[0] in self.unchecked_devices
            if (self.open_world or unchecked) and is_point_id(name):
                return "any"
            info = self.registry[name]  # KeyError: unknown name, reported by the compiler
            return _REGISTRY_KINDS.get(info.kind, "any")
        if name in self.visiting:
            raise _CycleError([*self.visiting[self.visiting.index(name) :], name])
        self.visiting.append(name)
        try:
            kind = self.build_point(name, source)
        finally:
            self.visiting.pop()
        self.kinds[name] = kind
        return kind

    def is_personal(self, point: str) -> bool:
        if point in self.derived:
            return self.derived[point][0].info.personal
        if point in self.virtual:
            return self.virtual[point].info.personal
        info = self.registry.get(point)
        return info is not None and info.personal

    def personal_reads(self, points: Iterable[str]) -> list[str]:
        return sorted(p for p in set(points) if self.is_personal(p))

    def derived_personal(
        self, point: str, config: DerivedPointConfig, smap: SourceMap, loc: Loc, reads: Iterable[str]
    ) -> bool:
        """A point computed from personal data is personal; saying otherwise is an error, not a way out."""
        personal = self.personal_reads(reads)
        if personal and config.personal is False:
            self.errors.append(
                smap.diagnostic(
                    (*loc, "personal"),
                    f"{point} is computed from the personal point {personal[0]}, so it is personal itself: "
                    "remove personal: false (docs/privacy.md)",
                )
            )
        return bool(personal) or bool(config.personal)

    def build_point(self, point: str, source: _PointSource) -> Kind:
        config, smap, loc = source.config, source.smap, source.loc
        info_args: dict[str, Any] = {
            "id": point,
            "unit": config.unit,
            "description": config.description,
            "measurement": RULE_MEASUREMENT,
            "physical": False,
        }
        aggregate = config.aggregate()
        if config.expr is not None:
            try:
                compiled = compile_expr(config.expr, self.scope)
            except ExprError as exc:
                self.errors.append(expr_diagnostic(smap, (*loc, "expr"), exc))
                return "any"
            info_args["personal"] = self.derived_personal(point, config, smap, loc, compiled.points)
            info = PointInfo(kind=_POINT_KINDS[compiled.kind], **info_args)
            derived = DerivedPoint(
                id=point,
                order=0,
                inputs=tuple(sorted(compiled.points)),
                info=info,
                expr=compiled.evaluate,
                definition=f"expr:{config.expr}",
            )
            self.derived[point] = (derived, compiled.points)
            return compiled.kind
        if aggregate is not None:
            function, source_point = aggregate
            try:
                source_kind = self.kind_of(source_point)
            except KeyError:
                self.errors.append(
                    smap.diagnostic((*loc, function), f"unknown point {source_point!r}{self.suggest(source_point)}")
                )
                return "num"
            if source_kind not in ("num", "any"):
                self.errors.append(
                    smap.diagnostic((*loc, function), f"{function} needs a numeric point; {source_point} is not")
                )
                return "num"
            assert config.window is not None
            kind: ValueKind = "int" if function == "count" else "float"
            info_args["personal"] = self.derived_personal(point, config, smap, loc, (source_point,))
            derived = DerivedPoint(
                id=point,
                order=0,
                inputs=(source_point,),
                info=PointInfo(kind=kind, **info_args),
                aggregate=aggregate,
                window_ns=round(config.window * 1e9),
                per_s=config.per,
                definition=f"{function}:{source_point}:{config.window}:{config.per}",
            )
            self.derived[point] = (derived, frozenset({source_point}))
            return "num"
        assert config.kind is not None
        kind_word = _REGISTRY_KINDS[config.kind]
        initial = config.initial
        if initial is not None and kind_of_value(initial) != kind_word:
            self.errors.append(smap.diagnostic((*loc, "initial"), f"initial value {initial!r} is not a {config.kind}"))
            initial = None
        info_args["personal"] = bool(config.personal)
        self.virtual[point] = VirtualPoint(point, kind_word, initial, PointInfo(kind=config.kind, **info_args))
        return kind_word

    def suggest(self, name: str) -> str:
        return did_you_mean(name, self.scope)

    def build_points(self) -> tuple[DerivedPoint, ...]:
        for point, source in self.point_configs.items():
            try:
                self.kind_of(point)
            except _CycleError as exc:
                self.errors.append(
                    source.smap.diagnostic(
                        (*source.loc, "expr"), f"derived points form a cycle: {' -> '.join(exc.chain)}"
                    )
                )
                self.kinds[point] = "any"
        # topological order: a point comes after every derived point it reads
        ordered: list[DerivedPoint] = []
        placed: set[str] = set()

        def place(point: str, trail: frozenset[str]) -> None:
            if point in placed or point not in self.derived or point in trail:
                return
            derived, inputs = self.derived[point]
            for name in sorted(inputs):
                place(name, trail | {point})
            placed.add(point)
            ordered.append(
                DerivedPoint(
                    id=derived.id,
                    order=len(ordered),
                    inputs=derived.inputs,
                    info=derived.info,
                    expr=derived.expr,
                    aggregate=derived.aggregate,
                    window_ns=derived.window_ns,
                    per_s=derived.per_s,
                    definition=derived.definition,
                )
            )

        for point in self.derived:
            place(point, frozenset())
        return tuple(ordered)

    # -- schedules and the allowlist -----------------------------------------------------------------------

    def build_schedules(self) -> dict[str, Schedule]:
        return {
            name: Schedule.from_config(name, config, self.timezone)
            for name, (config, _smap, _loc) in self.schedule_configs.items()
        }

    def build_allowlist(self) -> Allowlist:
        entries: dict[str, AllowedWrite] = {}
        for point, (entry, smap, loc) in self.allow_configs.items():
            info = self.registry.get(point)
            if info is None and (self.open_world or point.partition(".")[0] in self.unchecked_devices):
                info = PointInfo(id=point, writable=True)
            if info is None:
                self.errors.append(smap.diagnostic((*loc, "point"), f"unknown point {point!r}{self.suggest(point)}"))
                continue
            if not info.writable:
                message = f"{point} is not writable (see its device profile)"
                self.errors.append(smap.diagnostic((*loc, "point"), message))
                continue
            low, high = entry.min, entry.max
            if info.min is not None and low is not None and low < info.min:
                self.errors.append(
                    smap.diagnostic((*loc, "min"), f"min {low} is below the point's own minimum {info.min}")
                )
            if info.max is not None and high is not None and high > info.max:
                self.errors.append(
                    smap.diagnostic((*loc, "max"), f"max {high} is above the point's own maximum {info.max}")
                )
            entries[point] = AllowedWrite(
                point=point,
                kind=info.kind,
                min=low if low is not None else info.min,
                max=high if high is not None else info.max,
                values=tuple(entry.values) if entry.values is not None else None,
                priority=entry.priority,
                relinquish=entry.relinquish,
            )
        return Allowlist(entries)

    # -- rules ---------------------------------------------------------------------------------------------

    def compile_expr_at(
        self, source: str, smap: SourceMap, loc: Loc, lets: Mapping[str, Kind], *, want: Kind | None, used: set[str]
    ) -> CompiledExpr | None:
        try:
            compiled = compile_expr(source, self.scope, lets, want=want)
        except ExprError as exc:
            self.errors.append(expr_diagnostic(smap, loc, exc))
            return None
        except _CycleError as exc:  # pragma: no cover - cycles are reported once by build_points
            self.errors.append(smap.diagnostic(loc, f"derived points form a cycle: {exc}"))
            return None
        used.update(self.reads_of(compiled))
        return compiled

    def reads_of(self, compiled: CompiledExpr) -> set[str]:
        """The points an expression reads, directly or through the rule's ``let`` names."""
        reads = set(compiled.points)
        for name in compiled.lets:
            reads.update(self.let_points.get(name, ()))
        return reads

    def compile_value(
        self, value: Any, smap: SourceMap, loc: Loc, lets: Mapping[str, Kind], used: set[str]
    ) -> tuple[Evaluator, Kind] | None:
        """A literal, or text starting with ``=``: an expression."""
        if isinstance(value, str) and value.startswith("="):
            body = value[1:]
            try:
                compiled = compile_expr(body, self.scope, lets)
            except ExprError as exc:
                self.errors.append(expr_diagnostic(smap, loc, exc, skip=1))
                return None
            used.update(self.reads_of(compiled))
            return compiled.evaluate, compiled.kind
        return (lambda v, constant=value: constant), kind_of_value(value)

    def compile_template(
        self, template: Any, smap: SourceMap, loc: Loc, lets: Mapping[str, Kind], used: set[str]
    ) -> Evaluator:
        """A JSON-like structure whose ``=expr`` strings are evaluated when the action runs."""
        if isinstance(template, dict):
            parts = [
                (str(key), self.compile_template(value, smap, (*loc, key), lets, used))
                for key, value in template.items()
            ]
            return lambda v: {key: part(v) for key, part in parts}
        if isinstance(template, list):
            items = [self.compile_template(value, smap, (*loc, i), lets, used) for i, value in enumerate(template)]
            return lambda v: [item(v) for item in items]
        if template is None or isinstance(template, bool | int | float | str):
            compiled = self.compile_value(template, smap, loc, lets, used)
            return compiled[0] if compiled else (lambda v: None)
        self.errors.append(smap.diagnostic(loc, f"unsupported value {template!r} in a payload"))
        return lambda v: None

    def compile_outgoing(
        self, template: Any, smap: SourceMap, loc: Loc, lets: Mapping[str, Kind], used: set[str]
    ) -> Evaluator:
        """A publish payload or alarm/event data: they go to the city platform as they are, so reading a personal
        point there is refused (the rule's condition may read them: only its firing leaves the building)."""
        reads: set[str] = set()
        evaluator = self.compile_template(template, smap, loc, lets, reads)
        used.update(reads)
        personal = self.personal_reads(reads)
        if personal:
            what = "publish payload" if loc[-1] == "payload" else f"{loc[-2]} data"
            self.errors.append(
                smap.diagnostic(
                    loc,
                    f"this {what} reads the personal point {personal[0]}; it would go to the city platform as it "
                    "is, and personal data leaves the building only inside incentive records or as the building "
                    "aggregate (docs/privacy.md)",
                )
            )
        return evaluator

    def compile_action(
        self,
        action: Action,
        index: int,
        smap: SourceMap,
        loc: Loc,
        *,
        lets: Mapping[str, Kind],
        used: set[str],
        allowlist: Allowlist,
    ) -> CompiledAction | None:
        """One action of ``then``/``on_clear``, or None with its errors reported."""
        aloc: Loc = (*loc, action.kind)
        if action.write is not None:
            return self.compile_write(action.write, index, smap, aloc, lets=lets, used=used, allowlist=allowlist)
        if action.set is not None:
            return self.compile_set(action.set, index, smap, aloc, lets=lets, used=used)
        if action.publish is not None:
            payload = self.compile_outgoing(action.publish.payload, smap, (*aloc, "payload"), lets, used)
            return CompiledPublish(index, action.publish.topic, payload)
        if action.alarm is not None:
            alarm = action.alarm
            data = self.compile_outgoing(alarm.data, smap, (*aloc, "data"), lets, used)
            return CompiledAlarm(index, alarm.severity, alarm.message, alarm.subject, data)
        assert action.event is not None
        event = action.event
        data = self.compile_outgoing(event.data, smap, (*aloc, "data"), lets, used)
        return CompiledEvent(index, event.type, event.message, event.subject, data)

    def compile_write(
        self,
        write: WriteAction,
        index: int,
        smap: SourceMap,
        aloc: Loc,
        *,
        lets: Mapping[str, Kind],
        used: set[str],
        allowlist: Allowlist,
    ) -> CompiledWrite | None:
        point = write.point
        if point not in allowlist:
            if point in self.broken_allow:
                return None  # its allow entry is broken, and reported: a refusal here would blame the rule
            known = self.registry.get(point)
            why = "unknown point" if known is None else "not in the allow list of any rule file"
            self.errors.append(smap.diagnostic((*aloc, "point"), f"write to {point} refused at load: {why}"))
            return None
        entry = allowlist.entries[point]
        if write.relinquish:
            if not entry.relinquish:
                why = f"relinquish of {point} refused at load: its allow entry does not permit it (relinquish: true)"
                self.errors.append(smap.diagnostic((*aloc, "relinquish"), why))
                return None
            return CompiledWrite(index, point, None)
        assert write.value is not None  # WriteAction: a value unless relinquish
        value = self.compile_value(write.value, smap, (*aloc, "value"), lets, used)
        if value is None:
            return None
        if not self.open_world and value[1] not in (_REGISTRY_KINDS[entry.kind], "any"):
            why = f"{point} takes a {entry.kind}, this value is not one"
            self.errors.append(smap.diagnostic((*aloc, "value"), why))
            return None
        literal = write.value
        if not self.open_world and not (isinstance(literal, str) and literal.startswith("=")):
            try:
                allowlist.check(Command(point, literal, "load"))
            except WriteRejected as exc:
                self.errors.append(smap.diagnostic((*aloc, "value"), str(exc)))
                return None
        return CompiledWrite(index, point, value[0])

    def compile_set(
        self,
        action: SetAction,
        index: int,
        smap: SourceMap,
        aloc: Loc,
        *,
        lets: Mapping[str, Kind],
        used: set[str],
    ) -> CompiledSet | None:
        point = action.point
        virtual = self.virtual.get(point)
        if virtual is None:
            self.errors.append(
                smap.diagnostic(
                    (*aloc, "point"),
                    f"set needs a virtual point declared under points: (like {point}: {{kind: float}})",
                )
            )
            return None
        reads: set[str] = set()
        value = self.compile_value(action.value, smap, (*aloc, "value"), lets, reads)
        used.update(reads)
        if value is None:
            return None
        if value[1] not in (virtual.kind, "any") and virtual.kind != "any":
            self.errors.append(smap.diagnostic((*aloc, "value"), f"{point} is a {virtual.info.kind} point"))
            return None
        personal = self.personal_reads(reads)
        if personal and not virtual.info.personal:
            self.errors.append(
                smap.diagnostic(
                    (*aloc, "value"),
                    f"sets {point} from the personal point {personal[0]}: declare {point} with personal: true "
                    "(docs/privacy.md)",
                )
            )
            return None
        return CompiledSet(index, point, value[0])

    def build_rule(
        self, index: int, source: _RuleSource, schedules: Mapping[str, Schedule], allowlist: Allowlist
    ) -> CompiledRule | None:
        rule, smap, loc = source.config, source.smap, source.loc
        errors_before = len(self.errors)
        used: set[str] = set()
        let_kinds: dict[str, Kind] = {}
        lets: list[tuple[str, Evaluator]] = []
        self.let_points = {}
        for name, text in rule.let.items():
            if name in FUNCTIONS or name in ("true", "false", "True", "False"):
                self.errors.append(smap.diagnostic((*loc, "let", name), f"let name {name!r} is reserved", key=True))
                continue
            let_used: set[str] = set()
            compiled = self.compile_expr_at(text, smap, (*loc, "let", name), let_kinds, want=None, used=let_used)
            self.let_points[name] = frozenset(let_used)
            used.update(let_used)
            if compiled is not None:
                let_kinds[name] = compiled.kind
                lets.append((name, compiled.evaluate))
            else:
                let_kinds[name] = "any"
        when = clear_when = None
        if rule.when is not None:
            compiled = self.compile_expr_at(rule.when, smap, (*loc, "when"), let_kinds, want="bool", used=used)
            when = compiled.evaluate if compiled else None
        if rule.clear_when is not None:
            compiled = self.compile_expr_at(
                rule.clear_when, smap, (*loc, "clear_when"), let_kinds, want="bool", used=used
            )
            clear_when = compiled.evaluate if compiled else None
        schedule = None
        if rule.only_during is not None:
            schedule = schedules.get(rule.only_during)
            if schedule is None and rule.only_during not in self.broken_schedules:
                known = ", ".join(sorted(schedules)) or "none defined"
                message = f"unknown schedule {rule.only_during!r} (schedules: {known})"
                self.errors.append(smap.diagnostic((*loc, "only_during"), message))
        then: list[CompiledAction] = []
        on_clear: list[CompiledAction] = []
        for key, actions, out in (("then", rule.then, then), ("on_clear", rule.on_clear, on_clear)):
            for position, action in enumerate(actions):
                compiled_action = self.compile_action(
                    action, position, smap, (*loc, key, position), lets=let_kinds, used=used, allowlist=allowlist
                )
                if compiled_action is not None:
                    out.append(compiled_action)
        if len(self.errors) > errors_before:
            return None
        line = smap.values.get((*loc, "id"), (0, 0))[0]
        fingerprint = hashlib.sha256(f"{rule.when}|{rule.every}|{rule.only_during}".encode()).hexdigest()[:16]
        return CompiledRule(
            id=rule.id,
            index=index,
            file=smap.file,
            line=line,
            when=when,
            clear_when=clear_when,
            hold_ns=round(rule.hold * 1e9),
            cooldown_ns=round(rule.cooldown * 1e9),
            every_ns=round(rule.every * 1e9) if rule.every else 0,
            schedule=schedule,
            lets=tuple(lets),
            then=tuple(then),
            on_clear=tuple(on_clear),
            inputs=tuple(sorted(used)),
            fingerprint=fingerprint,
            enabled=rule.enabled,
        )


class _Names:
    """Names of definitions that failed validation (already reported): using one is not a second error."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def add_from(self, value: Any) -> None:
        """Every name a broken part may have defined: the text of its keys and values, however it is nested
        (``points: [building.x]`` is a list where a mapping belongs, yet it names ``building.x``). Only these are
        spared: any other unknown name is still reported."""
        if isinstance(value, str):
            self.names.add(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                self.add_from(key)
                self.add_from(item)
        elif isinstance(value, list):
            for item in value:
                self.add_from(item)

    def update(self, other: _Names) -> None:
        self.names |= other.names


@dataclass
class _FileParts:
    """What of one rule file can be checked: its valid definitions with their places in the file (a rule keeps
    its index when one before it is dropped, so positions stay right), and the names of the broken ones."""

    points: list[tuple[str, DerivedPointConfig]] = field(default_factory=list)
    schedules: list[tuple[str, ScheduleConfig]] = field(default_factory=list)
    allow: list[tuple[str, int, AllowEntry]] = field(default_factory=list)
    rules: list[tuple[int, RuleConfig]] = field(default_factory=list)
    broken_points: _Names = field(default_factory=_Names)
    broken_schedules: _Names = field(default_factory=_Names)
    broken_allow: _Names = field(default_factory=_Names)

    @classmethod
    def of(cls, config: RuleFileConfig) -> _FileParts:
        return cls(
            points=list(config.points.items()),
            schedules=list(config.schedules.items()),
            allow=[(group, i, entry) for group, entries in config.allow.items() for i, entry in enumerate(entries)],
            rules=list(enumerate(config.rules)),
        )


def _section(key: str, value: Any) -> RuleFileConfig | None:
    """A rule file holding only ``key: value``, validated; None when that part is invalid."""
    try:
        return RuleFileConfig.model_validate({"version": 1, key: value})
    except ValidationError:
        return None


def _salvage(data: dict[str, Any]) -> _FileParts:
    """The parts of a file that failed validation which are valid on their own, so the rest of the file is still
    checked (a bad schedule must not hide an unknown point in a rule). Only called after the file's errors are
    recorded: what is built from this is checked, never run, because the load fails anyway.

    A broken point, schedule or allow entry is left out and its name remembered (the loader then accepts the name
    without a second, misleading "unknown" error); a rule key that fails (a bad ``for:``) is left out of its rule
    and the rest of the rule is checked; a rule that fails as a whole (no ``id``, no ``then``) is left out."""
    parts = _FileParts()
    for key, names in (("points", parts.broken_points), ("schedules", parts.broken_schedules)):
        section = data.get(key, {})
        if not isinstance(section, dict):
            names.add_from(section)
            continue
        for name, spec in section.items():
            one = _section(key, {name: spec})
            if one is None:
                names.add_from(name)
            elif key == "points":
                parts.points.extend(one.points.items())
            else:
                parts.schedules.extend(one.schedules.items())
    allow = data.get("allow", {})
    for group, entries in allow.items() if isinstance(allow, dict) else []:
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            one = _section("allow", {group: [entry]})
            if one is not None and isinstance(group, str):
                parts.allow.append((group, index, one.allow[group][0]))
            else:
                parts.broken_allow.add_from(entry)
        if not isinstance(entries, list):
            parts.broken_allow.add_from(entries)
    if not isinstance(allow, dict):
        parts.broken_allow.add_from(allow)
    rules = data.get("rules", [])
    for index, rule in enumerate(rules if isinstance(rules, list) else []):
        checked = _rule_without_broken_keys(rule)
        if checked is not None:
            parts.rules.append((index, checked))
    return parts


def _rule_without_broken_keys(rule: Any) -> RuleConfig | None:
    """The rule with the keys (and actions) that failed validation left out, so the rest of it is still checked (a
    bad ``for:`` must not hide an unknown point in ``when:``); None when it does not validate even so.

    Nothing refers to a rule key or an action, so no error follows from the omission. A rule left with no action
    gets a silent placeholder one, only so its condition is still checked (its own "needs then:" error, if it never
    had an action, is already reported)."""
    one = _section("rules", [rule])
    if one is not None:
        return one.rules[0]
    if not isinstance(rule, dict):
        return None
    try:
        RuleFileConfig.model_validate({"version": 1, "rules": [rule]})
    except ValidationError as exc:
        pruned = dict(rule)
        actions: dict[str, set[int]] = {"then": set(), "on_clear": set()}
        for err in exc.errors(include_url=False):
            loc = err["loc"]
            if len(loc) > 3 and loc[2] in actions and isinstance(loc[3], int):
                actions[str(loc[2])].add(loc[3])
            elif len(loc) > 2:
                pruned.pop(str(loc[2]), None)
        for key, bad in actions.items():
            if bad and isinstance(pruned.get(key), list):
                pruned[key] = [action for i, action in enumerate(pruned[key]) if i not in bad]
        if not isinstance(rule.get("id"), str) or not RULE_ID_RE.match(rule["id"]):
            # a rule without a (valid) id is still checked under a stand-in; the id "" it gets below marks it
            # (never a duplicate of another rule, never run: the file's load fails)
            pruned["id"] = "no-id"
        one = _section("rules", [pruned])
        if one is None and not pruned.get("then") and not pruned.get("on_clear"):
            one = _section("rules", [{**pruned, "then": [{"event": {"type": "placeholder"}}]}])
        if one is None:
            return None
        checked = one.rules[0]
        return checked.model_copy(update={"id": ""}) if pruned.get("id") != rule.get("id") else checked
    return None  # pragma: no cover - only reached after the rule failed validation


def load_rule_set(
    files: Sequence[Path],
    registry: Mapping[str, PointInfo] | None,
    *,
    timezone: str,
    unchecked_devices: Iterable[str] = (),
) -> RuleSet:
    """Read, check and compile rule files; raise ``ConfigError`` with every problem found.

    ``registry`` None checks everything but point names and types (``rules check`` without a site).
    ``unchecked_devices``: devices of a refused site file whose points are not in ``registry`` (the device is
    broken, and reported); their points are accepted unchecked, as without a registry."""
    builder = _Builder(registry, timezone)
    builder.unchecked_devices = frozenset(unchecked_devices)
    for path in files:
        builder.add_file(Path(path))
    derived = builder.build_points()
    schedules = builder.build_schedules()
    allowlist = builder.build_allowlist()
    rules: list[CompiledRule] = []
    for source in builder.rule_configs:
        compiled = builder.build_rule(len(rules), source, schedules, allowlist)
        if compiled is not None:
            rules.append(compiled)
    if builder.errors:
        raise ConfigError(builder.errors)
    return RuleSet(
        derived=derived,
        virtual=builder.virtual,
        rules=tuple(rules),
        schedules=schedules,
        allowlist=allowlist,
        files=tuple(Path(f) for f in files),
        timezone=timezone,
    )
