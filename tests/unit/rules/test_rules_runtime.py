"""The rule engine as a pure stage on a fake clock: durable timers across restart, hot reload, the allowlist,
status, failure isolation, and the contract the supervisor relies on."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import orjson
import pytest

from gateway.config.site import load_site
from gateway.errors import ConfigError, StoreError, WriteRejected
from gateway.model import Command, Quality, Sample
from gateway.registry import PointRegistry
from rules.reload import RuleFileWatcher, reload
from rules.runtime import Outputs, RuleRuntime
from rules.state import RuleStateStore, SavedRuleState

ROOT = Path(__file__).resolve().parents[3]
T0 = 1_772_409_600 * 10**9  # 2026-03-02 00:00:00 UTC, a Monday
S = 10**9
MIN = 60 * S

CO2_RULE = """
version: 1
allow:
  simulator:
    - {point: ahu3.vent_setpoint_pct, min: 20, max: 100}
rules:
  - id: co2-high
    when: zone3.co2 > 1000
    for: 5min
    clear_when: zone3.co2 < 850
    then:
      - write: {point: ahu3.vent_setpoint_pct, value: 60}
      - alarm: {severity: major, message: CO2 high, data: {co2: "=zone3.co2"}}
"""


@pytest.fixture(scope="module")
def registry() -> PointRegistry:
    return load_site(ROOT / "firmware_configs" / "sites" / "demo.yaml").registry


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_until(runtime: RuleRuntime, start_ns: int, end_ns: int, step_ns: int = S) -> list[tuple[int, Outputs]]:
    """Tick the fake clock from start to end (inclusive); keep the steps that produced something."""
    fired = []
    now = start_ns
    while now <= end_ns:
        out = runtime.tick(now)
        if out.commands or out.events or out.transitions:
            fired.append((now, out))
        now += step_ns
    return fired


def co2(value: float, ts: int) -> Sample:
    return Sample("zone3.co2", value, ts, Quality.GOOD)


def test_restart_after_four_of_five_minutes_fires_one_minute_later(tmp_path: Path, registry: PointRegistry) -> None:
    rules = write(tmp_path, CO2_RULE)
    state_path = tmp_path / "rules-state.db"
    store = RuleStateStore(state_path)
    first = RuleRuntime.load([rules], registry, timezone="UTC", state=store)
    first.process([co2(1200, T0)], T0)
    for minute in range(1, 5):  # the condition holds, sampled every minute, for four minutes
        first.process([co2(1200, T0 + minute * MIN)], T0 + minute * MIN)
    assert not [out for _, out in run_until(first, T0, T0 + 4 * MIN) if out.commands]
    assert first.status()[0].state == "pending"
    first.flush_state()  # the supervisor flushes after every step
    store.close()  # the gateway stops (or the power goes)

    # restart: a new store on the same file, a new runtime with no current values
    store = RuleStateStore(state_path)
    second = RuleRuntime.load([rules], registry, timezone="UTC", state=store)
    assert second.status()[0].state == "pending"
    restart = T0 + 4 * MIN + 20 * S
    assert not second.tick(restart).commands  # no values yet: it cannot know the condition still holds
    second.process([co2(1190, restart)], restart)
    fired = [(now, out) for now, out in run_until(second, restart, T0 + 6 * MIN) if out.commands]
    assert [now for now, _ in fired] == [T0 + 5 * MIN]
    (_, out), *_ = fired
    assert out.commands == [Command("ahu3.vent_setpoint_pct", 60, "co2-high")]
    assert out.events[0].id == f"co2-high@{T0 + 5 * MIN}"
    store.close()


class FailingDiskStore(RuleStateStore):
    """A rule state file on a disk that refuses writes while ``failing`` is set (a fake for a failing disk)."""

    failing = False

    def save(self, states: Iterable[SavedRuleState]) -> None:
        if self.failing:
            raise StoreError(f"cannot write rule state {self.path}: disk I/O error")
        super().save(states)


def test_process_and_tick_write_nothing_flush_writes_what_changed(tmp_path: Path, registry: PointRegistry) -> None:
    store = RuleStateStore(tmp_path / "state.db")
    runtime = RuleRuntime.load([write(tmp_path, CO2_RULE)], registry, timezone="UTC", state=store)
    runtime.process([co2(1200, T0)], T0)
    runtime.tick(T0 + S)
    assert runtime.status()[0].state == "pending"
    assert store.load() == {}  # the stage did no I/O
    runtime.flush_state()
    saved = store.load()["co2-high"]
    assert (saved.state, saved.pending_ns) == ("pending", T0)
    runtime.flush_state()  # nothing changed since: nothing to write, and no error
    store.close()


def test_a_failed_flush_keeps_the_changes_for_the_next_one_and_the_outputs_are_not_lost(
    tmp_path: Path, registry: PointRegistry
) -> None:
    store = FailingDiskStore(tmp_path / "state.db")
    rules = write(tmp_path, CO2_RULE.replace("for: 5min", "for: 0s"))
    runtime = RuleRuntime.load([rules], registry, timezone="UTC", state=store)
    store.failing = True
    out = runtime.process([co2(1200, T0)], T0)
    assert out.commands == [Command("ahu3.vent_setpoint_pct", 60, "co2-high")]  # the step's outputs stand
    with pytest.raises(StoreError, match="disk I/O error"):
        runtime.flush_state()
    assert store.load() == {}
    store.failing = False
    runtime.flush_state()  # the disk is back: the latch is saved, so a restart will not fire it again
    assert store.load()["co2-high"].state == "active"
    runtime.close()


def test_close_with_the_disk_failing_logs_and_still_closes(
    tmp_path: Path, registry: PointRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    store = FailingDiskStore(tmp_path / "state.db")
    runtime = RuleRuntime.load([write(tmp_path, CO2_RULE)], registry, timezone="UTC", state=store)
    runtime.process([co2(1200, T0)], T0)
    store.failing = True
    runtime.close()  # the supervisor's shutdown goes on to close the outbox: close must not raise
    assert "rule state not saved at shutdown" in caplog.text
    assert "disk I/O error" in caplog.text
    with pytest.raises(StoreError):
        store.load()  # closed


def test_close_writes_what_is_still_unsaved(tmp_path: Path, registry: PointRegistry) -> None:
    rules = write(tmp_path, CO2_RULE)
    first = RuleRuntime.load([rules], registry, timezone="UTC", state=RuleStateStore(tmp_path / "state.db"))
    first.process([co2(1200, T0)], T0)
    first.close()
    second = RuleRuntime.load([rules], registry, timezone="UTC", state=RuleStateStore(tmp_path / "state.db"))
    assert second.status()[0].state == "pending"
    second.close()


def test_a_false_evaluation_resets_the_timer_but_a_gap_does_not(tmp_path: Path, registry: PointRegistry) -> None:
    runtime = RuleRuntime.load([write(tmp_path, CO2_RULE)], registry, timezone="UTC", state=None)
    runtime.process([co2(1200, T0)], T0)
    runtime.process([Sample("zone3.co2", None, T0 + MIN, Quality.BAD)], T0 + MIN)  # a gap
    assert runtime.status()[0].waiting_for == ("zone3.co2",)
    runtime.process([co2(1200, T0 + 2 * MIN)], T0 + 2 * MIN)
    assert [now for now, out in run_until(runtime, T0, T0 + 6 * MIN) if out.commands] == [T0 + 5 * MIN]

    runtime = RuleRuntime.load([write(tmp_path, CO2_RULE)], registry, timezone="UTC", state=None)
    runtime.process([co2(1200, T0)], T0)
    runtime.process([co2(900, T0 + MIN)], T0 + MIN)  # false: the timer starts again
    runtime.process([co2(1200, T0 + 2 * MIN)], T0 + 2 * MIN)
    assert [now for now, out in run_until(runtime, T0, T0 + 8 * MIN) if out.commands] == [T0 + 7 * MIN]


def test_an_active_latch_survives_restart_and_does_not_fire_twice(tmp_path: Path, registry: PointRegistry) -> None:
    rules = write(tmp_path, CO2_RULE.replace("for: 5min", "for: 0s"))
    store = RuleStateStore(tmp_path / "state.db")
    first = RuleRuntime.load([rules], registry, timezone="UTC", state=store)
    assert first.process([co2(1200, T0)], T0).commands
    first.flush_state()
    store.close()
    store = RuleStateStore(tmp_path / "state.db")
    second = RuleRuntime.load([rules], registry, timezone="UTC", state=store)
    assert second.status()[0].state == "active"
    assert not second.process([co2(1300, T0 + MIN)], T0 + MIN).commands
    cleared = second.process([co2(800, T0 + 2 * MIN)], T0 + 2 * MIN)
    # the clearing alarm carries the id of the activation before the restart
    assert [e.id for e in cleared.events] == [f"co2-high@{T0}/cleared"]
    assert cleared.events[0].body["state"] == "cleared"
    store.close()


def test_changing_a_rules_condition_discards_its_saved_timer(tmp_path: Path, registry: PointRegistry) -> None:
    rules = write(tmp_path, CO2_RULE)
    store = RuleStateStore(tmp_path / "state.db")
    first = RuleRuntime.load([rules], registry, timezone="UTC", state=store)
    first.process([co2(1200, T0)], T0)
    first.flush_state()
    assert store.load()["co2-high"].state == "pending"  # saved: what the changed condition must not resume
    changed = write(tmp_path, CO2_RULE.replace("zone3.co2 > 1000", "zone3.co2 > 1100"))
    second = RuleRuntime.load([changed], registry, timezone="UTC", state=store)
    assert second.status()[0].state == "idle"
    store.close()


def test_hot_reload_keeps_values_windows_and_timers(tmp_path: Path, registry: PointRegistry) -> None:
    text = CO2_RULE.replace("version: 1\n", "version: 1\npoints:\n  zone3.co2_avg: {avg: zone3.co2, window: 10min}\n")
    rules = write(tmp_path, text)
    old = RuleRuntime.load([rules], registry, timezone="UTC", state=None)
    old.process([co2(1200, T0), Sample("ahu3.vent_setpoint_pct", 40.0, T0, Quality.GOOD)], T0)
    old.process([co2(1300, T0 + 2 * MIN)], T0 + 2 * MIN)
    # the engineer adds a rule; the old one keeps its pending timer, the window keeps its samples
    added = text + (
        "  - id: avg-report\n    when: zone3.co2_avg > 0\n    then:\n"
        "      - publish: {topic: t/avg, payload: {avg: '=zone3.co2_avg'}}\n"
    )
    write(tmp_path, added)
    new = reload(old, [rules], registry, timezone="UTC", state=None)
    assert new.value("zone3.co2") == 1300
    assert new.value("zone3.co2_avg") == 1250
    assert {s.id: s.state for s in new.status()} == {"co2-high": "pending", "avg-report": "idle"}
    out = new.process([co2(1400, T0 + 3 * MIN)], T0 + 3 * MIN)
    assert out.publishes == [("t/avg", orjson.dumps({"avg": 1300.0}))]
    assert [now for now, o in run_until(new, T0 + 3 * MIN, T0 + 6 * MIN) if o.commands] == [T0 + 5 * MIN]


def test_a_broken_reload_raises_and_leaves_the_old_runtime_running(tmp_path: Path, registry: PointRegistry) -> None:
    rules = write(tmp_path, CO2_RULE)
    old = RuleRuntime.load([rules], registry, timezone="UTC", state=None)
    old.process([co2(1200, T0)], T0)
    write(tmp_path, CO2_RULE.replace("zone3.co2 > 1000", "zone3.co3 > 1000"))
    with pytest.raises(ConfigError) as caught:
        reload(old, [rules], registry, timezone="UTC", state=None)
    assert "unknown point 'zone3.co3'" in str(caught.value)
    assert [now for now, out in run_until(old, T0, T0 + 5 * MIN) if out.commands] == [T0 + 5 * MIN]


#: hostile rule files (issue 12): each must be refused by the reload in bounded time, the old rules untouched
HOSTILE = {
    "alias bomb": "version: 1\n"
    + "".join(f"l{i}: &a{i} [{', '.join([f'*a{i - 1}' if i else 'lol'] * 10)}]\n" for i in range(10)),
    "deep nesting": "version: 1\npoints: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "too big": CO2_RULE + "#" * (1024 * 1024) + "\n",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_reload_is_refused_and_leaves_the_old_runtime_running(
    kind: str, tmp_path: Path, registry: PointRegistry
) -> None:
    import time

    rules = write(tmp_path, CO2_RULE)
    old = RuleRuntime.load([rules], registry, timezone="UTC", state=None)
    old.process([co2(1200, T0)], T0)
    write(tmp_path, HOSTILE[kind])
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        reload(old, [rules], registry, timezone="UTC", state=None)
    assert time.monotonic() - started < 2.0
    [diagnostic] = caught.value.diagnostics
    assert diagnostic.file == str(rules)
    assert any(
        words in diagnostic.message for words in ("anchors and aliases", "nested more than 64", "limited to 1 MiB")
    )
    assert [now for now, out in run_until(old, T0, T0 + 5 * MIN) if out.commands] == [T0 + 5 * MIN]


def test_reload_does_not_accept_a_derived_point_the_new_files_removed(tmp_path: Path, registry: PointRegistry) -> None:
    rules = write(tmp_path, "version: 1\npoints:\n  zone3.double: {expr: 'zone3.co2 * 2'}\n")
    old = RuleRuntime.load([rules], registry, timezone="UTC", state=None)
    # the supervisor added the derived points to its registry
    with_derived = PointRegistry([*registry.values(), *old.derived_points()])
    write(
        tmp_path,
        "version: 1\nrules:\n  - id: r\n    when: zone3.double > 1\n    then: [{event: {type: x, message: m}}]\n",
    )
    with pytest.raises(ConfigError, match=r"unknown point 'zone3\.double'"):
        reload(old, [rules], with_derived, timezone="UTC", state=None)


def test_file_watcher_reports_a_change_once(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\n")
    watcher = RuleFileWatcher([path])
    assert not watcher.changed()
    path.write_text("version: 1\nrules: []\n")
    assert watcher.changed()
    assert not watcher.changed()
    path.unlink()
    assert watcher.changed()


def test_allowlist_checks_rule_and_platform_commands(tmp_path: Path, registry: PointRegistry) -> None:
    runtime = RuleRuntime.load([write(tmp_path, CO2_RULE)], registry, timezone="UTC", state=None)
    runtime.allowlist.check(Command("ahu3.vent_setpoint_pct", 55, "platform"))
    refused = [
        (Command("ahu3.vent_setpoint_pct", 120, "platform"), "above the maximum 100"),
        (Command("ahu3.vent_setpoint_pct", 10.5, "platform"), "below the minimum 20"),
        (Command("ahu3.vent_setpoint_pct", True, "platform"), "not a number"),
        (Command("ahu3.vent_setpoint_pct", float("nan"), "platform"), "not a finite number"),
        (Command("ahu3.vent_setpoint_pct", "60", "platform"), "not a number"),
        (Command("ahu3.fan_speed_pct", 50, "platform"), "not in the rules' allow list"),
    ]
    for command, message in refused:
        with pytest.raises(WriteRejected, match=message):
            runtime.allowlist.check(command)


def test_a_computed_write_out_of_bounds_is_refused_and_reported(tmp_path: Path, registry: PointRegistry) -> None:
    text = CO2_RULE.replace("value: 60}", "value: '=zone3.co2 / 10'}").replace("for: 5min", "for: 0s")
    runtime = RuleRuntime.load([write(tmp_path, text)], registry, timezone="UTC", state=None)
    out = runtime.process([co2(1500, T0)], T0)
    assert out.commands == []
    assert "150.0 is above the maximum 100" in out.problems[0].message
    assert runtime.status()[0].state == "active"  # the rule itself did not fail; the write was refused


def test_one_failing_rule_does_not_stop_the_others(tmp_path: Path, registry: PointRegistry) -> None:
    text = """
version: 1
rules:
  - id: divides
    when: zone3.co2 / zone3.occupancy > 100
    then: [{event: {type: x, message: per person}}]
  - id: plain
    when: zone3.co2 > 1000
    then: [{event: {type: x, message: high}}]
"""
    runtime = RuleRuntime.load([write(tmp_path, text)], registry, timezone="UTC", state=None)
    out = runtime.process([co2(1200, T0), Sample("zone3.occupancy", 0, T0, Quality.GOOD)], T0)
    assert [e.subject for e in out.events] == ["plain"]
    status = {s.id: s for s in runtime.status()}
    assert status["divides"].state == "failed"
    assert "ZeroDivisionError" in (status["divides"].last_error or "")
    assert status["divides"].failures == 1
    # failed stays failed (no event storm), until a reload builds the rule again
    runtime.process([Sample("zone3.occupancy", 2, T0 + S, Quality.GOOD)], T0 + S)
    assert {s.id: s.state for s in runtime.status()}["divides"] == "failed"
    fresh = reload(runtime, [write(tmp_path, text)], registry, timezone="UTC", state=None)
    assert {s.id: s.state for s in fresh.status()}["divides"] == "idle"


def test_samples_of_its_own_points_are_ignored_on_input(tmp_path: Path, registry: PointRegistry) -> None:
    text = "version: 1\npoints:\n  zone3.double: {expr: 'zone3.co2 * 2'}\n"
    runtime = RuleRuntime.load([write(tmp_path, text)], registry, timezone="UTC", state=None)
    out = runtime.process([co2(500, T0)], T0)
    assert out.samples == [Sample("zone3.double", 1000.0, T0, Quality.GOOD)]
    # the bus hands the derived sample back: nothing happens, and the value is not overwritten
    assert not runtime.process([Sample("zone3.double", 7.0, T0 + S, Quality.GOOD)], T0 + S)
    assert runtime.value("zone3.double") == 1000.0


def test_derived_points_for_the_registry(tmp_path: Path, registry: PointRegistry) -> None:
    runtime = RuleRuntime.load(
        [ROOT / "firmware_configs" / "rules" / "demo.yaml"], registry, timezone="UTC", state=None
    )
    infos = {info.id: info for info in runtime.derived_points()}
    assert all(not info.physical for info in infos.values())
    assert infos["building.load_shed"].kind == "bool"
    assert infos["zone3.co2_avg15"].unit == "ppm"
    assert infos["main_meter.kwh_last_hour"].kind == "float"
    merged = PointRegistry([*registry.values(), *infos.values()])  # no duplicate with device points
    assert len(merged) == len(registry) + len(infos)


def test_demo_rules_run_on_simulated_data(registry: PointRegistry) -> None:
    runtime = RuleRuntime.load(
        [ROOT / "firmware_configs" / "rules" / "demo.yaml"], registry, timezone="UTC", state=None
    )
    values = {point: 1.0 for point, info in registry.items() if info.kind != "bool"}
    values.update({"main_meter.power_kw": 75.0, "ahu3.vent_setpoint_pct": 40.0})
    batch = [Sample(point, value, T0, Quality.GOOD) for point, value in values.items()]
    events = []
    for minute in range(4):
        now = T0 + minute * MIN
        events.extend(runtime.process([Sample(s.point, s.value, now, s.quality) for s in batch], now).events)
        for second in range(0, 60, 10):
            out = runtime.tick(now + second * S)
            events.extend(out.events)
    assert [e.type for e in events] == ["demand_response"]
    assert runtime.value("building.load_shed") is True
    assert all(s.failures == 0 for s in runtime.status())


def test_state_store_rejects_an_unusable_path(tmp_path: Path) -> None:
    from gateway.errors import StoreError

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError):
        RuleStateStore(blocker / "rules-state.db")


def test_every_is_aligned_to_the_sites_local_clock(tmp_path: Path, registry: PointRegistry) -> None:
    text = (
        "version: 1\nrules:\n  - id: daily\n    every: 1d\n"
        "    then: [{publish: {topic: daily, payload: {kw: '=main_meter.power_kw'}}}]\n"
    )
    runtime = RuleRuntime.load([write(tmp_path, text)], registry, timezone="Asia/Kolkata", state=None)
    runtime.process([Sample("main_meter.power_kw", 5.0, T0, Quality.GOOD)], T0)
    fired = [now for now, out in run_until(runtime, T0, T0 + 2 * 24 * 60 * MIN, step_ns=MIN) if out.transitions]
    # local midnight in Kolkata (UTC+05:30) is 18:30 UTC
    assert fired == [T0 + (18 * 60 + 30) * MIN, T0 + (42 * 60 + 30) * MIN]


def test_reload_keeps_the_store_and_zone_by_default(tmp_path: Path, registry: PointRegistry) -> None:
    rules = write(tmp_path, CO2_RULE)
    store = RuleStateStore(tmp_path / "state.db")
    old = RuleRuntime.load([rules], registry, timezone="Asia/Shanghai", state=store)
    old.process([co2(1200, T0)], T0)
    new = reload(old, [rules], registry)  # what the supervisor calls on SIGHUP
    assert new.rule_set.timezone == "Asia/Shanghai"
    new.process([co2(1300, T0 + MIN)], T0 + MIN)
    new.close()
    resumed = RuleRuntime.load([rules], registry, timezone="UTC", state=RuleStateStore(tmp_path / "state.db"))
    assert resumed.status()[0].state == "pending"
    resumed.close()


def test_initial_values_of_virtual_points_are_announced_once(tmp_path: Path, registry: PointRegistry) -> None:
    text = "version: 1\npoints:\n  building.shed: {kind: bool, initial: false}\n  building.mode: {kind: str}\n"
    rules = write(tmp_path, text)
    runtime = RuleRuntime.load([rules], registry, timezone="UTC", state=None)
    assert runtime.initial_samples(T0) == [Sample("building.shed", False, T0, Quality.GOOD)]
    assert runtime.initial_samples(T0 + S) == []  # once; a point without `initial:` has nothing to announce
    # a reload keeps the value the old runtime had (announced already) and announces only the point it adds
    write(tmp_path, text + "  building.alert: {kind: int, initial: 0}\n")
    new = reload(runtime, [rules], registry, timezone="UTC", state=None)
    assert new.initial_samples(T0 + 2 * S) == [Sample("building.alert", 0, T0 + 2 * S, Quality.GOOD)]
    assert new.value("building.shed") is False


SHED_RULE = """
version: 1
points:
  building.load_shed: {kind: bool, initial: false}
rules:
  - id: shed
    when: main_meter.power_kw > 60
    clear_when: main_meter.power_kw < 50
    then: [{set: {point: building.load_shed, value: true}}]
    on_clear: [{set: {point: building.load_shed, value: false}}]
"""


def test_a_restart_resumes_what_a_latch_set_not_the_initial_value(tmp_path: Path, registry: PointRegistry) -> None:
    rules = write(tmp_path, SHED_RULE)
    store = RuleStateStore(tmp_path / "state.db")
    first = RuleRuntime.load([rules], registry, timezone="UTC", state=store)
    assert first.initial_samples(T0) == [Sample("building.load_shed", False, T0, Quality.GOOD)]
    first.process([Sample("main_meter.power_kw", 75.0, T0, Quality.GOOD)], T0)
    assert first.value("building.load_shed") is True
    first.flush_state()  # the supervisor flushes after every step
    store.close()
    store = RuleStateStore(tmp_path / "state.db")
    second = RuleRuntime.load([rules], registry, timezone="UTC", state=store)
    assert second.status()[0].state == "active"
    assert second.initial_samples(T0 + MIN) == [Sample("building.load_shed", True, T0 + MIN, Quality.GOOD)]
    store.close()
    # a saved value of the wrong kind (the point was redeclared) is ignored: `initial:` applies
    write(
        tmp_path,
        SHED_RULE.replace("kind: bool, initial: false", "kind: int, initial: 0")
        .replace("true}", "1}")
        .replace("false}", "0}"),
    )
    store = RuleStateStore(tmp_path / "state.db")
    third = RuleRuntime.load([rules], registry, timezone="UTC", state=store)
    assert third.initial_samples(T0 + 2 * MIN) == [Sample("building.load_shed", 0, T0 + 2 * MIN, Quality.GOOD)]
    store.close()
