"""Broken rule files: each is refused at load with the exact position (line:col) and a message that says why.

The files live in tests/cases/rules/broken/; the table below is their specification.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.site import load_site
from gateway.errors import ConfigError
from gateway.registry import PointRegistry
from rules.loader import load_rule_set

ROOT = Path(__file__).resolve().parents[3]
BROKEN = ROOT / "tests" / "cases" / "rules" / "broken"

#: file -> (line, column, part of the message) of the first diagnostic
EXPECTED: dict[str, tuple[int, int, str]] = {
    "alarm_personal_derived": (8, 67, "this alarm data reads the personal point apt101.kwh_1h"),
    "alias_bomb": (5, 11, "YAML anchors and aliases are not allowed (they can expand without limit)"),
    "allow_not_writable": (5, 15, "zone3.co2 is not writable"),
    "bad_action_and_unknown_point": (6, 9, "each action is exactly one of write, publish, alarm, event, set"),
    "bad_allow_entry": (4, 7, "min 60.0 is above max 20.0"),
    "bad_point_definition": (3, 20, "window is only used with avg, min, max, sum, count, integrate or rate"),
    "bad_schedule_definition": (3, 52, "invalid time '25:00'"),
    "and_needs_bool": (4, 35, "'and' needs true/false, got a number"),
    "bad_duration": (5, 10, "invalid duration '5 minutes'"),
    "block_scalar_second_line": (6, 25, "unknown point 'zone3.occupants' (did you mean 'zone3.occupancy'?)"),
    "derived_cycle": (3, 25, "cycle: building.a_kw -> building.b_kw -> building.a_kw"),
    "deep_nesting": (66, 131, "nested more than 64 levels deep"),
    "derived_personal_false": (3, 77, "computed from the personal point apt101.power_kw, so it is personal itself"),
    "dunder_attribute": (4, 12, "attribute '__class__' not allowed"),
    "duplicate_key": (5, 5, "duplicate key 'when': the first one (line 4) is kept, this one is ignored"),
    "duplicate_rule_id": (7, 9, "rule id 'co2-high' used twice"),
    "duration_and_unknown_point": (5, 10, "invalid duration '5 minutes'"),
    "function_not_allowed": (9, 57, "function 'open' not allowed"),
    "huge_power": (4, 24, "huge power"),
    "missing_required_key": (3, 5, "missing required key 'id'"),
    "payload_expression": (6, 75, "attribute access not allowed"),
    "publish_personal": (6, 51, "this publish payload reads the personal point apt101.energy_kwh"),
    "publish_personal_let": (8, 50, "this publish payload reads the personal point apt101.power_kw"),
    "set_personal_virtual": (8, 47, "declare building.flat_kw with personal: true"),
    "set_undeclared": (6, 22, "set needs a virtual point declared under points:"),
    "syntax_error": (4, 22, "syntax error"),
    "tab_indent": (4, 1, "a tab cannot indent YAML: use spaces"),
    "unclosed_flow_mapping": (6, 16, "the '{' opened at 6:16 is never closed: add '}' after its last item (line 6)"),
    "unclosed_quote": (4, 11, 'the quote " opened at 4:11 is never closed: close it at the end of the value'),
    "unknown_key": (5, 5, "unknown key 'clear_whn'"),
    "unknown_let": (6, 11, "unknown name 'ration'"),
    "unknown_point": (4, 32, "unknown point 'zone3.co3' (did you mean 'zone3.co2'?)"),
    "unknown_schedule": (7, 18, "unknown schedule 'office' (schedules: office_hours)"),
    "when_not_bool": (4, 11, "must give true/false, it gives a number"),
    "window_missing": (3, 18, "avg needs a window"),
    "wrong_type_top_level": (2, 9, "points: should be a mapping (key: value lines, or {key: value}), not a list"),
    "write_not_allowed": (9, 24, "write to ahu3.fan_speed_pct refused at load"),
    "write_out_of_bounds": (9, 55, "120 is above the maximum 100"),
}


@pytest.fixture(scope="module")
def registry() -> PointRegistry:
    return load_site(ROOT / "firmware_configs" / "sites" / "demo.yaml").registry


def test_every_broken_file_has_an_expectation() -> None:
    assert sorted(p.stem for p in BROKEN.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_rule_file_is_refused_at_its_position(name: str, registry: PointRegistry) -> None:
    path = BROKEN / f"{name}.yaml"
    with pytest.raises(ConfigError) as caught:
        load_rule_set([path], registry, timezone="UTC")
    first = caught.value.diagnostics[0]
    line, col, message = EXPECTED[name]
    assert (first.file, first.line, first.col) == (str(path), line, col), first.format()
    assert message in first.message
    # the printed form has the offending line and a caret under the column
    printed = first.format().splitlines()
    assert printed[0].startswith(f"{path}:{line}:{col}: ")
    assert printed[1].strip() == path.read_text().splitlines()[line - 1].strip()
    assert printed[2].index("^") - 4 == col - 1


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path, registry: PointRegistry) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(
        "version: 1\n"
        "rules:\n"
        "  - id: one\n"
        "    when: zone3.co3 > 1\n"
        "    then: [{event: {type: x, message: m}}]\n"
        "  - id: two\n"
        "    when: zone9.co2 > 1\n"
        "    only_during: nowhere\n"
        "    then: [{event: {type: x, message: m}}]\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_rule_set([path], registry, timezone="UTC")
    assert [(d.line, d.col) for d in caught.value.diagnostics] == [(4, 11), (7, 11), (8, 18)]


@pytest.mark.parametrize(
    ("name", "positions"),
    [
        ("duration_and_unknown_point", [(5, 10), (4, 11)]),  # the bad duration does not hide the unknown point
        ("duplicate_key", [(5, 5), (6, 18)]),  # nor does a duplicate key hide the unknown schedule
        # a broken definition is reported, and a rule naming it is not blamed for it; the rest is still checked
        ("bad_point_definition", [(3, 20), (6, 38)]),
        ("bad_schedule_definition", [(3, 52), (6, 11)]),
        ("bad_allow_entry", [(4, 7), (7, 11)]),
        ("bad_action_and_unknown_point", [(6, 9), (4, 11)]),
        # a rule without its required id, or with a bad one, is reported and still checked; so is the next rule
        ("missing_required_key", [(3, 5), (6, 9), (3, 11), (7, 11), (11, 11)]),
        # a section of the wrong type, and another: both reported, the names they held spared, zone3.co3 not
        ("wrong_type_top_level", [(2, 9), (3, 12), (6, 38)]),
    ],
)
def test_one_error_does_not_hide_another(name: str, positions: list[tuple[int, int]], registry: PointRegistry) -> None:
    with pytest.raises(ConfigError) as caught:
        load_rule_set([BROKEN / f"{name}.yaml"], registry, timezone="UTC")
    assert [(d.line, d.col) for d in caught.value.diagnostics] == positions


def test_names_are_unique_across_files(tmp_path: Path, registry: PointRegistry) -> None:
    first = tmp_path / "a.yaml"
    second = tmp_path / "b.yaml"
    first.write_text("version: 1\npoints:\n  building.x: {expr: 'zone3.co2 * 2'}\n")
    second.write_text("version: 1\npoints:\n  building.x: {expr: 'zone3.co2 * 3'}\n")
    with pytest.raises(ConfigError) as caught:
        load_rule_set([first, second], registry, timezone="UTC")
    (diagnostic,) = caught.value.diagnostics
    assert (diagnostic.file, diagnostic.line, diagnostic.col) == (str(second), 3, 3)
    assert "defined twice" in diagnostic.message


def test_a_derived_point_may_not_shadow_a_device_point(tmp_path: Path, registry: PointRegistry) -> None:
    path = tmp_path / "shadow.yaml"
    path.write_text("version: 1\npoints:\n  zone3.co2: {expr: 'zone2.co2'}\n")
    with pytest.raises(ConfigError, match="is a device point"):
        load_rule_set([path], registry, timezone="UTC")


def test_a_missing_rule_file_is_a_config_error(tmp_path: Path, registry: PointRegistry) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_rule_set([tmp_path / "absent.yaml"], registry, timezone="UTC")


def test_let_names_cannot_hide_functions_or_booleans(tmp_path: Path, registry: PointRegistry) -> None:
    path = tmp_path / "let.yaml"
    path.write_text(
        "version: 1\nrules:\n  - id: r\n    let: {max: zone3.co2}\n    when: max > 1\n"
        "    then: [{event: {type: x, message: m}}]\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_rule_set([path], registry, timezone="UTC")
    first = caught.value.diagnostics[0]
    assert (first.line, first.col) == (4, 11)
    assert "let name 'max' is reserved" in first.message
