"""Rules and personal data: rules read personal points freely, what they compute from them is personal, and nothing
computed from them goes to the platform through a rule action (the refusals are in test_rules_broken.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.site import load_site
from gateway.registry import PointRegistry
from rules.loader import load_rule_set
from rules.runtime import RuleRuntime, reload

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def registry() -> PointRegistry:
    return load_site(ROOT / "firmware_configs" / "sites" / "demo.yaml").registry


def _rules(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text("version: 1\n" + text)
    return path


def test_demo_derived_points_from_apartments_are_personal_and_the_others_are_not(registry: PointRegistry) -> None:
    demo = ROOT / "firmware_configs" / "rules" / "demo.yaml"
    runtime = RuleRuntime.load([demo], registry, timezone="UTC", state=None)
    personal = {info.id: info.personal for info in runtime.derived_points()}
    assert personal == {
        "apt101.apparent_kva": True,  # from apt101's voltage and current
        "building.tenant_kw": True,  # the sum of three flats
        "building.common_kw": True,  # through building.tenant_kw: followed along the chain
        "zone3.co2_avg15": False,
        "zone3.temp_max1h": False,
        "main_meter.peak_kw_15min": False,
        "main_meter.kwh_last_hour": False,
        "ahu3.filter_dp_rate": False,
        "building.load_shed": False,  # a virtual point set from literals
    }


def test_rules_may_read_personal_points_for_conditions_writes_and_declared_personal_points(
    tmp_path: Path, registry: PointRegistry
) -> None:
    path = _rules(
        tmp_path,
        """
points:
  apt101.kwh_1h: {rate: apt101.energy_kwh, window: 1h, per: 1h}
  apt101.heavy: {kind: bool, initial: false, personal: true}
  zone1.flag: {kind: bool, initial: false}
allow:
  simulator:
    - {point: ahu3.vent_setpoint_pct, min: 20, max: 100}
rules:
  - id: heavy-use
    let:
      kw: apt101.power_kw
    when: kw > 5 and apt101.kwh_1h > 3
    then:
      - set: {point: apt101.heavy, value: "=kw > 6"}
      - set: {point: zone1.flag, value: true}
      - write: {point: ahu3.vent_setpoint_pct, value: "=clamp(apt101.power_kw * 10, 20, 100)"}
      - publish: {topic: alerts/building, payload: {message: a flat draws a lot, zone: "=zone1.co2"}}
      - alarm: {severity: info, message: Heavy use somewhere}
""",
    )
    rule_set = load_rule_set([path], registry, timezone="UTC")
    assert rule_set.derived[0].info.personal
    assert rule_set.virtual["apt101.heavy"].info.personal
    assert not rule_set.virtual["zone1.flag"].info.personal
    assert set(rule_set.rules[0].inputs) >= {"apt101.power_kw", "apt101.kwh_1h", "zone1.co2"}


def test_without_a_site_nothing_is_known_to_be_personal(tmp_path: Path) -> None:
    path = _rules(
        tmp_path,
        """
rules:
  - id: report
    every: 1h
    then:
      - publish: {topic: reports/flat, payload: {kwh: "=apt101.energy_kwh"}}
""",
    )
    assert load_rule_set([path], None, timezone="UTC").rules  # `rules check` without --site cannot tell


def test_a_reload_keeps_derived_points_personal(tmp_path: Path, registry: PointRegistry) -> None:
    path = _rules(tmp_path, "points:\n  building.flats_kw: {expr: 'apt101.power_kw + apt102.power_kw'}\n")
    first = RuleRuntime.load([path], registry, timezone="UTC", state=None)
    grown = PointRegistry([*registry.values(), *first.derived_points()])
    path.write_text("version: 1\npoints:\n  building.flats_kw: {expr: 'apt101.power_kw + apt201.power_kw'}\n")
    second = reload(first, [path], grown)
    assert [(i.id, i.personal) for i in second.derived_points()] == [("building.flats_kw", True)]


def test_a_rule_cannot_redefine_the_building_aggregate(tmp_path: Path) -> None:
    from gateway.errors import ConfigError

    site = load_site(ROOT / "firmware_configs" / "sites" / "demo.yaml")
    assert not site.registry["building.energy_kwh_total"].personal
    path = _rules(tmp_path, "points:\n  building.energy_kwh_total: {expr: 'apt101.energy_kwh * 1'}\n")
    with pytest.raises(ConfigError, match=r"'building\.energy_kwh_total' is the gateway's own point; pick another"):
        load_rule_set([path], site.registry, timezone="UTC")
