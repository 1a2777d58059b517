"""Priorities and relinquish in the allowlist and the write action: the entry's slot stamped on every command, a
relinquish on clear, and the refusals (not permitted, reserved or impossible priority, value and relinquish both)."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.bacnet.config import RESERVED_PRIORITIES as DRIVER_RESERVED
from gateway.config.site import load_site
from gateway.errors import ConfigError, WriteRejected
from gateway.model import Command, Quality, Sample
from gateway.registry import PointInfo, PointRegistry
from rules.config import RESERVED_PRIORITIES
from rules.runtime import RuleRuntime

ROOT = Path(__file__).resolve().parents[3]
T0 = 1_772_409_600 * 10**9
S = 10**9

RELINQUISH_RULE = """
version: 1
allow:
  bms:
    - {point: ahu3.vent_setpoint_pct, min: 20, max: 100, priority: 12, relinquish: true}
    - {point: lamp.level, min: 0, max: 100}
rules:
  - id: co2-high
    when: zone3.co2 > 1000
    clear_when: zone3.co2 < 850
    then:
      - write: {point: ahu3.vent_setpoint_pct, value: 60}
    on_clear:
      - write: {point: ahu3.vent_setpoint_pct, relinquish: true}
"""


@pytest.fixture(scope="module")
def registry() -> PointRegistry:
    registry = load_site(ROOT / "firmware_configs" / "sites" / "demo.yaml").registry
    registry.add(PointInfo("lamp.level", writable=True, min=0, max=100))  # a second writable point
    return registry


def load(tmp_path: Path, registry: PointRegistry, text: str) -> RuleRuntime:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return RuleRuntime.load([path], registry, timezone="UTC", state=None)


def co2(value: float, ts: int) -> Sample:
    return Sample("zone3.co2", value, ts, Quality.GOOD)


def test_a_rule_writes_at_its_entry_priority_and_relinquishes_that_slot_on_clear(
    tmp_path: Path, registry: PointRegistry
) -> None:
    runtime = load(tmp_path, registry, RELINQUISH_RULE)
    fired = runtime.process([co2(1200, T0)], T0)
    assert fired.commands == [Command("ahu3.vent_setpoint_pct", 60, "co2-high", priority=12)]
    cleared = runtime.process([co2(800, T0 + S)], T0 + S)
    assert cleared.commands == [Command("ahu3.vent_setpoint_pct", None, "co2-high", priority=12, relinquish=True)]
    assert not cleared.problems


def test_the_allowlist_stamps_the_entry_priority_whatever_the_sender_asked(
    tmp_path: Path, registry: PointRegistry
) -> None:
    allowlist = load(tmp_path, registry, RELINQUISH_RULE).allowlist
    sent = allowlist.check(Command("ahu3.vent_setpoint_pct", 40, "platform", priority=3))
    assert sent.priority == 12  # the slot is the entry's: a sender cannot pick a higher one
    # a relinquish carries no value, even if one came along, and releases the entry's slot
    released = allowlist.check(Command("ahu3.vent_setpoint_pct", 55, "platform", relinquish=True))
    assert released == Command("ahu3.vent_setpoint_pct", None, "platform", priority=12, relinquish=True)
    # an entry without priority leaves the slot to the driver (a BACnet point's profile priority)
    assert allowlist.check(Command("lamp.level", 40, "platform")).priority is None


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (Command("lamp.level", None, "platform", relinquish=True), "does not permit it"),
        (Command("lamp.level", None, "platform"), "no value"),
        (Command("lamp.level", None, "platform", relinquish=False), "no value"),
        (Command("ahu3.cooling_valve_pct", None, "platform", relinquish=True), "not in the rules' allow list"),
    ],
)
def test_relinquish_refusals_at_run_time(
    tmp_path: Path, registry: PointRegistry, command: Command, message: str
) -> None:
    allowlist = load(tmp_path, registry, RELINQUISH_RULE).allowlist
    with pytest.raises(WriteRejected, match=message):
        allowlist.check(command)


@pytest.mark.parametrize(
    ("entry", "action", "message"),
    [
        ("{point: ahu3.vent_setpoint_pct}", "{point: ahu3.vent_setpoint_pct, relinquish: true}", "does not permit"),
        ("{point: ahu3.vent_setpoint_pct, priority: 6}", "{point: ahu3.vent_setpoint_pct, value: 40}", "reserved"),
        ("{point: ahu3.vent_setpoint_pct, priority: 1}", "{point: ahu3.vent_setpoint_pct, value: 40}", "reserved"),
        ("{point: ahu3.vent_setpoint_pct, priority: 2}", "{point: ahu3.vent_setpoint_pct, value: 40}", "reserved"),
        ("{point: ahu3.vent_setpoint_pct, priority: 17}", "{point: ahu3.vent_setpoint_pct, value: 40}", "16"),
        ("{point: ahu3.vent_setpoint_pct, priority: 0}", "{point: ahu3.vent_setpoint_pct, value: 40}", "1"),
        (
            "{point: ahu3.vent_setpoint_pct, relinquish: yes}",
            "{point: ahu3.vent_setpoint_pct, value: 40}",
            "expected true",
        ),
        (
            "{point: ahu3.vent_setpoint_pct, relinquish: true}",
            "{point: ahu3.vent_setpoint_pct, value: 40, relinquish: true}",
            "not both",
        ),
        ("{point: ahu3.vent_setpoint_pct, relinquish: true}", "{point: ahu3.vent_setpoint_pct}", "needs a value"),
    ],
)
def test_relinquish_and_priority_refusals_at_load(
    tmp_path: Path, registry: PointRegistry, entry: str, action: str, message: str
) -> None:
    text = f"""
version: 1
allow:
  bms:
    - {entry}
rules:
  - id: r
    when: zone3.co2 > 1000
    then:
      - write: {action}
"""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, registry, text)
    assert message in str(caught.value)


def test_rules_and_the_bacnet_driver_reserve_the_same_priorities() -> None:
    assert RESERVED_PRIORITIES == DRIVER_RESERVED == {1, 2, 6}
