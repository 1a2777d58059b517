"""The rule engine: a pure stage that turns samples and a clock into derived samples, commands, events and publishes.

Owns ``RuleRuntime`` (``load``, ``process``, ``tick``, ``replace``, ``status``), ``Outputs`` and the state machine of
one rule::

    idle --when true--> pending --held for `for:` and cooldown over--> active --clear_when (or not when)--> idle
      any state --expression raised--> failed (until the next reload)

The engine reads no clock and does no I/O in ``process`` and ``tick``: ``now_ns`` is an argument, so every test runs
on a fake clock. Rule state that must outlive a restart (so a ``for:`` timer that has run four of its five minutes
resumes) is only marked there; ``flush_state()`` writes what changed to the ``RuleStateStore`` the runtime was given,
and the owner calls it between steps (the supervisor after handling each step's outputs). A flush that fails keeps
what it could not write for the next one, and never costs a step its outputs. Loading (``load``, ``reload``) reads
the store and prunes rows of rules that are gone. It must never import drivers, uplinks or asyncio.

Rules about data:

* A point without a current value (never read, or its last sample BAD) is *missing*. A rule that names a missing
  point does not evaluate and the runtime reports which points it waits for; a missing value is never read as 0.
  A gap in data does not reset a pending ``for:`` timer; an evaluation to false does.
* A derived point whose inputs are missing, or whose expression fails (say a division by zero), becomes BAD (one BAD
  sample, one problem) until it can be computed again.
* A rule whose expression raises at run time is marked ``failed`` and reported; every other rule keeps running.
* Samples of points this runtime produces (derived and virtual points) are ignored on input: the runtime already
  applied them when it produced them, and the bus may hand them back.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from zoneinfo import ZoneInfo

import orjson

from gateway.errors import StoreError, WriteRejected
from gateway.model import Command, Event, Quality, Sample
from gateway.registry import PointInfo
from rules.expr import kind_of_value
from rules.loader import (
    Allowlist,
    CompiledAction,
    CompiledAlarm,
    CompiledEvent,
    CompiledPublish,
    CompiledRule,
    CompiledSet,
    CompiledWrite,
    DerivedPoint,
    RuleSet,
    load_rule_set,
)
from rules.schedule import Schedule
from rules.state import RuleStateStore, SavedRuleState
from rules.window import Window

log = logging.getLogger(__name__)

__all__ = [
    "Outputs",
    "Problem",
    "RuleRuntime",
    "RuleStateStore",
    "RuleStatus",
    "Transition",
    "reload",
]

#: how many times one call lets rule outputs (``set:`` virtual points) feed back into derived points and rules
MAX_PASSES = 4

IDLE = "idle"
PENDING = "pending"
ACTIVE = "active"
FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Problem:
    """Something an operator should see: a rule waiting for inputs, a failed rule, a refused write.

    ``ongoing``: a condition rather than a single happening. It lasts until the runtime reports the subject in
    ``Outputs.resolved`` (a derived point computed again, a rule whose inputs all have values again) or, for a failed
    rule, until the next reload. A refused write is not ongoing: it happened once.
    """

    subject: str
    message: str
    ts: int
    ongoing: bool = False

    def __str__(self) -> str:
        return f"{self.subject}: {self.message}"


@dataclass(frozen=True, slots=True)
class Transition:
    """A rule changed state (``fired``: ran its ``then`` actions without changing state, for ``every:``)."""

    rule: str
    old: str
    new: str
    ts: int
    reason: str


@dataclass(slots=True)
class Outputs:
    samples: list[Sample] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    #: (topic relative to the platform prefix, JSON payload)
    publishes: list[tuple[str, bytes]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    #: ongoing problems that are over (same subject; the message says how it ended)
    resolved: list[Problem] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.samples
            or self.commands
            or self.events
            or self.publishes
            or self.problems
            or self.resolved
            or self.transitions
        )


@dataclass(frozen=True, slots=True)
class RuleStatus:
    id: str
    state: str
    since_ns: int
    last_error: str | None
    evaluations: int
    failures: int
    #: points the rule is waiting for (no current value)
    waiting_for: tuple[str, ...]


@dataclass(slots=True)
class _RuleState:
    state: str = IDLE
    since_ns: int = 0
    pending_ns: int | None = None
    activated_ns: int | None = None
    last_fired_ns: int | None = None
    next_due_ns: int | None = None
    #: the last evaluation found the condition true with every input present
    holding: bool = False
    in_schedule: bool | None = None
    missing: tuple[str, ...] = ()
    last_error: str | None = None
    evaluations: int = 0
    failures: int = 0


class _RuleFailed(Exception):
    pass


class _Keep:
    """The default of ``reload(state=...)``: keep the old runtime's store."""


_KEEP = _Keep()


class RuleRuntime:
    """One loaded rule set and its live state. Not thread-safe: the supervisor calls it from one task."""

    def __init__(self, rule_set: RuleSet, *, state: RuleStateStore | None = None) -> None:
        self.rule_set = rule_set
        self.allowlist: Allowlist = rule_set.allowlist
        self._store = state
        self._values: dict[str, Any] = {}
        self._uncertain: set[str] = set()
        self._derived = rule_set.derived
        self._derived_by_id = {d.id: d for d in self._derived}
        self._produced = frozenset(self._derived_by_id) | frozenset(rule_set.virtual)
        self._derived_by_input: dict[str, list[DerivedPoint]] = {}
        self._window_feeds: dict[str, list[Window]] = {}
        self._windows: dict[str, Window] = {}
        for derived in self._derived:
            for name in derived.inputs:
                self._derived_by_input.setdefault(name, []).append(derived)
            if derived.aggregate is not None:
                window = Window(derived.aggregate[0], derived.window_ns, derived.per_s)
                self._windows[derived.id] = window
        self._rebuild_feeds()
        self._aggregates = [d for d in self._derived if d.aggregate is not None]
        self._missing_derived: set[str] = set()
        self._rules = rule_set.rules
        self._rules_by_input: dict[str, list[int]] = {}
        for rule in self._rules:
            for name in rule.inputs:
                self._rules_by_input.setdefault(name, []).append(rule.index)
        self._states = [_RuleState() for _ in self._rules]
        #: indices of rules whose durable state changed since the last ``flush_state``
        self._dirty: set[int] = set()
        #: virtual points a `set:` changed since the last ``flush_state``
        self._dirty_values: set[str] = set()
        self._schedule_cache: dict[str, tuple[int, bool]] = {}
        self._zone = ZoneInfo(rule_set.timezone)
        #: virtual points holding their ``initial:`` value that no sample has announced yet (``initial_samples``)
        self._unannounced: set[str] = set()
        for virtual in rule_set.virtual.values():
            if virtual.initial is not None:
                self._values[virtual.id] = virtual.initial
                self._unannounced.add(virtual.id)
        if state is not None:
            self._restore(state)

    # -- construction -----------------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        files: Sequence[Path],
        registry: Mapping[str, PointInfo],
        *,
        timezone: str,
        state: RuleStateStore | None,
    ) -> RuleRuntime:
        """Check and compile ``files``; raise ``ConfigError`` (every problem, positioned) or return a runtime that
        resumes the persisted state of its rules."""
        return cls(load_rule_set(files, registry, timezone=timezone), state=state)

    def close(self) -> None:
        """Write what is still unsaved and close the state store (at shutdown; a runtime replaced by a reload shares
        its store with its successor, which carries its unsaved changes over). Never raises: it runs in the
        supervisor's shutdown, which must still close the outbox; a last write that fails is logged."""
        if self._store is None:
            return
        try:
            self.flush_state()
        except StoreError as exc:
            log.error("rule state not saved at shutdown: %s", exc)
        finally:
            self._store.close()

    def _rebuild_feeds(self) -> None:
        self._window_feeds = {}
        for derived in self._derived:
            if derived.aggregate is not None:
                self._window_feeds.setdefault(derived.aggregate[1], []).append(self._windows[derived.id])

    def _restore(self, store: RuleStateStore) -> None:
        saved = store.load()
        for rule, st in zip(self._rules, self._states, strict=True):
            row = saved.get(rule.id)
            if row is None or row.fingerprint != rule.fingerprint or row.state not in (IDLE, PENDING, ACTIVE):
                continue
            st.state = row.state
            st.since_ns = row.since_ns
            st.pending_ns = row.pending_ns
            st.activated_ns = row.activated_ns
            st.last_fired_ns = row.last_fired_ns
            st.next_due_ns = row.next_due_ns
        store.keep_only(rule.id for rule in self._rules)
        # what rules last set resumes (a restored latch and its `set:` agree); `initial:` is for a first start
        virtual = self.rule_set.virtual
        for point, value in store.load_values().items():
            known = virtual.get(point)
            if known is not None and kind_of_value(value) == known.kind:
                self._values[point] = value
                self._unannounced.add(point)
        store.keep_values(virtual)

    def replace(self, other: RuleRuntime) -> None:
        """Take over from ``other`` (the runtime this one replaces on reload): current values, windows of derived
        points whose definition is unchanged, and the state of rules that still exist with the same condition."""
        for point, value in other._values.items():
            if point in other._produced and point not in self._produced:
                continue  # a derived or virtual point the new rule set no longer has
            old_derived = other._derived_by_id.get(point)
            new_derived = self._derived_by_id.get(point)
            if old_derived and new_derived and old_derived.definition != new_derived.definition:
                continue
            self._values[point] = value
            self._unannounced.discard(point)  # the old runtime's value (announced, or set by a rule) stands
            if point in other._dirty_values and point in self.rule_set.virtual:
                self._dirty_values.add(point)  # set by a rule but not saved yet (a flush failed): save it from here
        self._uncertain = set(other._uncertain)
        for point, window in self._windows.items():
            old_window = other._windows.get(point)
            if old_window is not None and old_window.same_definition(window):
                self._windows[point] = old_window
        self._rebuild_feeds()
        old_states = {rule.id: (rule, st) for rule, st in zip(other._rules, other._states, strict=True)}
        for rule, st in zip(self._rules, self._states, strict=True):
            found = old_states.get(rule.id)
            if found is None or found[0].fingerprint != rule.fingerprint or found[1].state == FAILED:
                continue
            old = found[1]
            st.state, st.since_ns, st.pending_ns = old.state, old.since_ns, old.pending_ns
            st.activated_ns, st.last_fired_ns, st.next_due_ns = old.activated_ns, old.last_fired_ns, old.next_due_ns
            st.holding, st.in_schedule = old.holding, old.in_schedule
            st.evaluations, st.failures = old.evaluations, old.failures
            self._dirty.add(rule.index)

    # -- what the supervisor reads ------------------------------------------------------------------------------

    def derived_points(self) -> list[PointInfo]:
        """Derived and virtual points, to add to the registry (``physical=False``)."""
        return [d.info for d in self._derived] + [v.info for v in self.rule_set.virtual.values()]

    def status(self) -> list[RuleStatus]:
        return [
            RuleStatus(
                id=rule.id,
                state=st.state if rule.enabled else "disabled",
                since_ns=st.since_ns,
                last_error=st.last_error,
                evaluations=st.evaluations,
                failures=st.failures,
                waiting_for=st.missing,
            )
            for rule, st in zip(self._rules, self._states, strict=True)
        ]

    def initial_samples(self, now_ns: int) -> list[Sample]:
        """GOOD samples of the virtual points that hold their ``initial:`` value (or, after a restart, the value a
        rule last set), stamped ``now_ns``, once: the supervisor publishes them at start (and after a reload that
        adds a virtual point), so such a point reads as that value rather than as never read. A point the old
        runtime had (on reload) keeps its value and is not announced again."""
        points = sorted(self._unannounced)
        self._unannounced.clear()
        return [Sample(point, self._values[point], now_ns, Quality.GOOD) for point in points if point in self._values]

    def value(self, point: str) -> Any:
        """The runtime's current value of ``point`` (None when missing); for tests and the CLI."""
        return self._values.get(point)

    # -- the stage ------------------------------------------------------------------------------------------------

    def process(self, batch: Sequence[Sample], now_ns: int) -> Outputs:
        """Apply a batch of samples and evaluate everything that depends on them."""
        out = Outputs()
        values = self._values
        produced = self._produced
        feeds = self._window_feeds
        uncertain = self._uncertain
        changed: set[str] = set()
        for sample in batch:
            point = sample.point
            if point in produced:
                continue
            value = sample.value
            quality = sample.quality
            if quality >= Quality.BAD or value is None:
                values.pop(point, None)
            else:
                values[point] = value
                windows = feeds.get(point)
                if windows is not None and not isinstance(value, bool | str):
                    for window in windows:
                        window.add(sample.ts, float(value))
            if quality == Quality.UNCERTAIN:
                uncertain.add(point)
            elif uncertain:
                uncertain.discard(point)
            changed.add(point)
        self._propagate(changed, set(), now_ns, out)
        return out

    def tick(self, now_ns: int) -> Outputs:
        """Advance time: expire window samples, fire ``for:`` timers and periodic rules, follow schedule edges."""
        out = Outputs()
        expired = {d.id for d in self._aggregates if self._windows[d.id].expire(now_ns)}
        self._propagate(set(), expired, now_ns, out)
        fed_back: set[str] = set()
        for rule, st in zip(self._rules, self._states, strict=True):
            if st.state == FAILED or not rule.enabled:
                continue
            try:
                self._tick_rule(rule, st, now_ns, out, fed_back)
            except _RuleFailed:
                continue
        # virtual points set by timed firings feed the rules and derived points that read them, in this same step
        self._propagate(fed_back, set(), now_ns, out)
        return out

    def _tick_rule(self, rule: CompiledRule, st: _RuleState, now_ns: int, out: Outputs, fed_back: set[str]) -> None:
        if rule.schedule is not None:
            inside = self._in_schedule(rule.schedule, now_ns)
            if inside != st.in_schedule:
                if not inside:
                    self._leave_schedule(rule, st, now_ns, out, fed_back)
                    return
                st.in_schedule = True
                if rule.when is not None:
                    self._evaluate(rule, st, now_ns, out, fed_back)
                    return
            elif not inside:
                return
        if st.state == PENDING and st.holding:
            self._try_fire(rule, st, now_ns, out, fed_back)
        elif rule.every_ns and (rule.when is None or st.state == ACTIVE):
            if st.next_due_ns is None:
                st.next_due_ns = self._next_due(rule, now_ns)
                self._dirty.add(rule.index)
            elif now_ns >= st.next_due_ns:
                st.next_due_ns = self._next_due(rule, now_ns)
                self._dirty.add(rule.index)
                if self._inputs_ready(rule, st, now_ns, out):
                    try:
                        self._run_lets(rule, self._values)
                    except Exception as exc:
                        self._fail(rule, st, exc, now_ns, out)
                    self._repeat(rule, st, now_ns, out, fed_back)

    # -- propagation ------------------------------------------------------------------------------------------

    def _propagate(self, changed: set[str], dirty_derived: set[str], now_ns: int, out: Outputs) -> None:
        passes = 0
        while (changed or dirty_derived) and passes < MAX_PASSES:
            passes += 1
            derived_by_input = self._derived_by_input
            for point in changed:
                dependents = derived_by_input.get(point)
                if dependents is not None:
                    dirty_derived.update(d.id for d in dependents)
            if dirty_derived:
                for derived in self._derived:
                    if derived.id in dirty_derived:
                        self._compute(derived, now_ns, out)
                        changed.add(derived.id)
                        for dependent in derived_by_input.get(derived.id, ()):
                            dirty_derived.add(dependent.id)
            rules_by_input = self._rules_by_input
            due: set[int] = set()
            for point in changed:
                indices = rules_by_input.get(point)
                if indices is not None:
                    due.update(indices)
            fed_back: set[str] = set()
            for index in sorted(due):
                rule = self._rules[index]
                st = self._states[index]
                if st.state == FAILED or not rule.enabled:
                    continue
                try:
                    if rule.when is not None:
                        self._evaluate(rule, st, now_ns, out, fed_back)
                except _RuleFailed:
                    continue
            changed = fed_back
            dirty_derived = set()

    def _compute(self, derived: DerivedPoint, now_ns: int, out: Outputs) -> None:
        values = self._values
        if derived.expr is not None:
            missing = [name for name in derived.inputs if name not in values]
            if missing:
                self._derived_missing(derived, f"waiting for {', '.join(missing)}", now_ns, out)
                return
            try:
                value = derived.expr(values)
            except Exception as exc:
                self._derived_missing(derived, f"cannot compute: {type(exc).__name__}: {exc}", now_ns, out)
                return
            if isinstance(value, float) and not math.isfinite(value):
                self._derived_missing(derived, f"cannot compute: result is {value}", now_ns, out)
                return
        else:
            window = self._windows[derived.id]
            window.expire(now_ns)
            value = window.value()
            if value is None:
                why = "no samples in its window" if not len(window) else "needs two samples in its window"
                self._derived_missing(derived, why, now_ns, out)
                return
        values[derived.id] = value
        if derived.id in self._missing_derived:
            self._missing_derived.discard(derived.id)
            out.resolved.append(Problem(derived.id, "computed again", now_ns))
        uncertain = self._uncertain
        quality = Quality.UNCERTAIN if uncertain and any(i in uncertain for i in derived.inputs) else Quality.GOOD
        if quality == Quality.UNCERTAIN:
            uncertain.add(derived.id)
        elif uncertain:
            uncertain.discard(derived.id)
        out.samples.append(Sample(derived.id, value, now_ns, quality))

    def _derived_missing(self, derived: DerivedPoint, why: str, now_ns: int, out: Outputs) -> None:
        had_value = self._values.pop(derived.id, None) is not None
        if derived.id in self._missing_derived:
            return
        self._missing_derived.add(derived.id)
        out.problems.append(Problem(derived.id, why, now_ns, ongoing=True))
        if had_value:
            out.samples.append(Sample(derived.id, None, now_ns, Quality.BAD))

    # -- one rule -----------------------------------------------------------------------------------------------

    def _in_schedule(self, schedule: Schedule, now_ns: int) -> bool:
        cached = self._schedule_cache.get(schedule.name)
        if cached is not None and cached[0] == now_ns:
            return cached[1]
        inside = schedule.active(now_ns)
        self._schedule_cache[schedule.name] = (now_ns, inside)
        return inside

    def _inputs_ready(self, rule: CompiledRule, st: _RuleState, now_ns: int, out: Outputs) -> bool:
        values = self._values
        missing = tuple(name for name in rule.inputs if name not in values)
        if missing != st.missing:
            was_missing = st.missing
            st.missing = missing
            if missing:
                message = f"not evaluated: no value for {', '.join(missing)}"
                out.problems.append(Problem(rule.id, message, now_ns, ongoing=True))
            elif was_missing:
                out.resolved.append(Problem(rule.id, "every input has a value again", now_ns))
        return not missing

    def _run_lets(self, rule: CompiledRule, values: dict[str, Any]) -> None:
        for name, fn in rule.lets:
            values[name] = fn(values)

    def _evaluate(self, rule: CompiledRule, st: _RuleState, now_ns: int, out: Outputs, fed_back: set[str]) -> None:
        if rule.schedule is not None:
            inside = self._in_schedule(rule.schedule, now_ns)
            if not inside:
                if st.in_schedule is not False:
                    self._leave_schedule(rule, st, now_ns, out, fed_back)
                return
            st.in_schedule = True
        if not self._inputs_ready(rule, st, now_ns, out):
            st.holding = False
            return
        values = self._values
        st.evaluations += 1
        try:
            self._run_lets(rule, values)
            if st.state == ACTIVE:
                clear = rule.clear_when(values) if rule.clear_when is not None else not rule.when(values)  # type: ignore[misc]
                if clear:
                    self._clear(
                        rule,
                        st,
                        now_ns,
                        out,
                        fed_back=fed_back,
                        reason="clear_when" if rule.clear_when else "when is false",
                    )
                return
            assert rule.when is not None
            holds = bool(rule.when(values))
        except _RuleFailed:
            raise
        except Exception as exc:
            self._fail(rule, st, exc, now_ns, out)
        st.holding = holds
        if not holds:
            if st.state == PENDING:
                self._move(rule, st, IDLE, now_ns, out, reason="condition no longer holds")
                st.pending_ns = None
            return
        if st.state == IDLE:
            st.pending_ns = now_ns
            if rule.hold_ns > 0 or not self._cooled_down(rule, st, now_ns):
                self._move(rule, st, PENDING, now_ns, out, reason="condition holds")
                if rule.hold_ns > 0:
                    return
        self._try_fire(rule, st, now_ns, out, fed_back)

    def _cooled_down(self, rule: CompiledRule, st: _RuleState, now_ns: int) -> bool:
        return st.last_fired_ns is None or now_ns - st.last_fired_ns >= rule.cooldown_ns

    def _try_fire(self, rule: CompiledRule, st: _RuleState, now_ns: int, out: Outputs, fed_back: set[str]) -> None:
        assert st.pending_ns is not None
        if now_ns - st.pending_ns < rule.hold_ns or not self._cooled_down(rule, st, now_ns):
            return
        if not self._inputs_ready(rule, st, now_ns, out):
            return
        # `let` names live in the shared values dict: recompute this rule's own before its actions read them, or a
        # timer firing from tick() would write another rule's value of the same name
        try:
            self._run_lets(rule, self._values)
        except Exception as exc:
            self._fail(rule, st, exc, now_ns, out)
        if rule.cooldown_ns and st.last_fired_ns is not None and now_ns - st.pending_ns > rule.hold_ns:
            reason = "cooldown over"
        elif rule.hold_ns:
            reason = f"held for {_seconds(now_ns - st.pending_ns)}"
        else:
            reason = "condition holds"
        self._move(rule, st, ACTIVE, now_ns, out, reason=reason)
        st.activated_ns = now_ns
        st.last_fired_ns = now_ns
        st.pending_ns = None
        if rule.every_ns:
            st.next_due_ns = now_ns + rule.every_ns
        self._run_actions(rule, st, rule.then, now_ns, episode_ns=now_ns, phase="then", out=out, fed_back=fed_back)

    def _repeat(self, rule: CompiledRule, st: _RuleState, now_ns: int, out: Outputs, fed_back: set[str]) -> None:
        """An ``every:`` rule's periodic firing."""
        st.last_fired_ns = now_ns
        self._dirty.add(rule.index)
        out.transitions.append(Transition(rule.id, st.state, st.state, now_ns, "every"))
        self._run_actions(rule, st, rule.then, now_ns, episode_ns=now_ns, phase="then", out=out, fed_back=fed_back)

    def _next_due(self, rule: CompiledRule, now_ns: int) -> int:
        if rule.when is not None:
            return now_ns + rule.every_ns
        # aligned to the local clock of the site, like cron: every: 1d fires at local midnight, 1h on the hour
        # even in a zone with a half-hour offset
        local = dt.datetime.fromtimestamp(now_ns / 1e9, self._zone)
        utc_offset = local.utcoffset()
        offset = round(utc_offset.total_seconds() * 1e9) if utc_offset is not None else 0
        return ((now_ns + offset) // rule.every_ns + 1) * rule.every_ns - offset

    def _clear(
        self, rule: CompiledRule, st: _RuleState, now_ns: int, out: Outputs, *, fed_back: set[str], reason: str
    ) -> None:
        activated = st.activated_ns if st.activated_ns is not None else now_ns
        self._move(rule, st, IDLE, now_ns, out, reason=reason)
        st.pending_ns = None
        st.holding = False
        for action in rule.then:
            if isinstance(action, CompiledAlarm):
                out.events.append(self._alarm_event(rule, action, activated, now_ns, "cleared"))
        self._run_actions(
            rule, st, rule.on_clear, now_ns, episode_ns=activated, phase="clear", out=out, fed_back=fed_back
        )
        st.activated_ns = None

    def _leave_schedule(
        self, rule: CompiledRule, st: _RuleState, now_ns: int, out: Outputs, fed_back: set[str]
    ) -> None:
        st.in_schedule = False
        if st.state == ACTIVE:
            if self._inputs_ready(rule, st, now_ns, out):
                try:
                    self._run_lets(rule, self._values)
                except Exception as exc:
                    self._fail(rule, st, exc, now_ns, out)
                self._clear(rule, st, now_ns, out, fed_back=fed_back, reason="schedule ended")
            else:
                # on_clear cannot run without its inputs; the alarm still clears so nothing stays raised forever
                activated = st.activated_ns if st.activated_ns is not None else now_ns
                self._move(rule, st, IDLE, now_ns, out, reason="schedule ended")
                for action in rule.then:
                    if isinstance(action, CompiledAlarm):
                        out.events.append(self._alarm_event(rule, action, activated, now_ns, "cleared"))
                st.activated_ns = None
        elif st.state == PENDING:
            self._move(rule, st, IDLE, now_ns, out, reason="schedule ended")
            st.pending_ns = None
        st.holding = False

    def _move(self, rule: CompiledRule, st: _RuleState, new: str, now_ns: int, out: Outputs, *, reason: str) -> None:
        out.transitions.append(Transition(rule.id, st.state, new, now_ns, reason))
        st.state = new
        st.since_ns = now_ns
        self._dirty.add(rule.index)

    def _fail(self, rule: CompiledRule, st: _RuleState, exc: Exception, now_ns: int, out: Outputs) -> NoReturn:
        message = f"{type(exc).__name__}: {exc}"
        st.last_error = message
        st.failures += 1
        st.holding = False
        self._move(rule, st, FAILED, now_ns, out, reason=message)
        failed = f"rule failed and is disabled until the next reload: {message}"
        out.problems.append(Problem(rule.id, failed, now_ns, ongoing=True))
        raise _RuleFailed from exc

    # -- actions ------------------------------------------------------------------------------------------------

    def _run_actions(
        self,
        rule: CompiledRule,
        st: _RuleState,
        actions: tuple[CompiledAction, ...],
        now_ns: int,
        *,
        episode_ns: int,
        phase: str,
        out: Outputs,
        fed_back: set[str],
    ) -> None:
        values = self._values
        for action in actions:
            try:
                match action:
                    case CompiledWrite():
                        self._write(rule, st, action, now_ns, out)
                    case CompiledSet():
                        value = action.value(values)
                        values[action.point] = value
                        self._unannounced.discard(action.point)
                        self._dirty_values.add(action.point)
                        out.samples.append(Sample(action.point, value, now_ns, Quality.GOOD))
                        fed_back.add(action.point)
                    case CompiledPublish():
                        out.publishes.append((action.topic, orjson.dumps(action.payload(values))))
                    case CompiledAlarm():
                        out.events.append(self._alarm_event(rule, action, episode_ns, now_ns, "raised"))
                    case CompiledEvent():
                        out.events.append(
                            Event(
                                id=f"{rule.id}@{now_ns}/{phase}{action.index}",
                                type=action.event_type,
                                subject=action.subject or rule.id,
                                ts=now_ns,
                                body={"rule": rule.id, "message": action.message, "data": action.data(values)},
                            )
                        )
            except Exception as exc:
                self._fail(rule, st, exc, now_ns, out)

    def _write(self, rule: CompiledRule, st: _RuleState, action: CompiledWrite, now_ns: int, out: Outputs) -> None:
        """A write goes out only through the allowlist; a refusal is reported and the rule keeps running."""
        if action.value is None:
            command = Command(action.point, None, rule.id, relinquish=True)
        else:
            command = Command(action.point, action.value(self._values), rule.id)
        try:
            command = self.allowlist.check(command)
        except WriteRejected as exc:
            st.last_error = str(exc)
            out.problems.append(Problem(rule.id, str(exc), now_ns))
            return
        out.commands.append(command)

    def _alarm_event(
        self, rule: CompiledRule, action: CompiledAlarm, episode_ns: int, now_ns: int, state: str
    ) -> Event:
        try:
            data = action.data(self._values)
        except Exception:
            data = {}  # the alarm itself matters more than its data: raise (or clear) it without
        return Event(
            id=f"{rule.id}@{episode_ns}" + ("" if state == "raised" else "/cleared"),
            type="alarm",
            subject=action.subject or rule.id,
            ts=now_ns,
            body={
                "rule": rule.id,
                "state": state,
                "severity": action.severity,
                "message": action.message,
                "raised_ts": episode_ns,
                "data": data,
            },
        )

    # -- durable state --------------------------------------------------------------------------------------

    def flush_state(self) -> None:
        """Write the rule states and virtual point values that changed since the last flush to the store (a no-op
        without one). Raises ``StoreError``; what was not written stays marked and goes with the next flush."""
        store = self._store
        if store is None:
            self._dirty_values.clear()
            self._dirty.clear()
            return
        if self._dirty_values:
            values = self._values
            store.save_values((point, values[point]) for point in sorted(self._dirty_values) if point in values)
            self._dirty_values.clear()
        if self._dirty:
            rules, states = self._rules, self._states
            store.save(
                SavedRuleState(
                    rule_id=rules[i].id,
                    fingerprint=rules[i].fingerprint,
                    state=states[i].state,
                    since_ns=states[i].since_ns,
                    pending_ns=states[i].pending_ns,
                    activated_ns=states[i].activated_ns,
                    last_fired_ns=states[i].last_fired_ns,
                    next_due_ns=states[i].next_due_ns,
                )
                for i in sorted(self._dirty)
            )
            self._dirty.clear()


def _seconds(ns: int) -> str:
    seconds = ns / 1e9
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}min"
    return f"{seconds:g}s"


def reload(
    old: RuleRuntime,
    files: Sequence[Path],
    registry: Mapping[str, PointInfo],
    *,
    timezone: str | None = None,
    state: RuleStateStore | _Keep | None = _KEEP,
) -> RuleRuntime:
    """Load ``files`` into a new runtime that carries over ``old``'s values, windows, timers and latches.

    Raises ``ConfigError`` (every problem, positioned) and leaves ``old`` untouched when the new files are invalid.
    ``timezone`` and ``state`` default to ``old``'s. ``registry`` may still hold the old rule set's derived points:
    they are set aside, so a rule naming a derived point the new files removed is an error rather than a point that
    never gets a value.
    """
    produced = old._produced
    devices_only = {point: info for point, info in registry.items() if point not in produced or info.physical}
    store = old._store if isinstance(state, _Keep) else state
    new = RuleRuntime.load(files, devices_only, timezone=timezone or old.rule_set.timezone, state=store)
    new.replace(old)
    return new
