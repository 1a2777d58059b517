"""Fuzzing whole rule files: random mutations of the demo rule file either load or raise ConfigError, nothing else.

Every diagnostic must carry a position inside the file, so an engineer is never left with an error and no place.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config.site import load_site
from gateway.errors import ConfigError
from gateway.registry import PointRegistry
from rules.loader import load_rule_set

ROOT = Path(__file__).resolve().parents[3]
DEMO = yaml.safe_load((ROOT / "firmware_configs" / "rules" / "demo.yaml").read_text())
REGISTRY: PointRegistry = load_site(ROOT / "firmware_configs" / "sites" / "demo.yaml").registry

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(
        [
            "zone3.co2 > 1000",
            "=zone3.co2 * 2",
            "=__import__('os')",
            "zone3.co2.__class__",
            "5min",
            "-1s",
            "07:00",
            "mon-fri",
            "ahu3.vent_setpoint_pct",
            "building.load_shed",
            "office_hours",
            "99 ** 99999",
            "(" * 300,
        ]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _paths(value, (*prefix, index))
    return out


PATHS = [p for p in _paths(DEMO) if p]


def _mutate(document: Any, path: tuple[Any, ...], action: str, value: Any) -> Any:
    document = copy.deepcopy(document)
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "rename" and isinstance(parent, dict):
        parent[f"{last}x"] = parent.pop(last)
    else:
        parent[last] = value
    return document


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    mutations=st.lists(
        st.tuples(st.sampled_from(PATHS), st.sampled_from(["replace", "delete", "rename"]), VALUES),
        min_size=1,
        max_size=3,
    )
)
def test_mutated_rule_files_load_or_raise_positioned_config_errors(
    workdir: Path, mutations: list[tuple[tuple[Any, ...], str, Any]]
) -> None:
    document: Any = DEMO
    for path, action, value in mutations:
        try:
            document = _mutate(document, path, action, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    path = workdir / "mutated.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    try:
        load_rule_set([path], REGISTRY, timezone="Asia/Shanghai")
    except ConfigError as exc:
        assert exc.diagnostics
        for diagnostic in exc.diagnostics:
            assert diagnostic.line >= 1, diagnostic.format()
            assert diagnostic.message
