"""Golden broken incentive configs: tests/cases/incentives/<case>/{site.yaml, expected.err}.

Each case is checked the way the gateway meets it: loading the site, then the site-level cross-checks, then opening
the ledger (keys). ``expected.err`` holds the ``file:line:col: message`` line of each diagnostic.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.config.site import load_site
from gateway.errors import ConfigError, Diagnostic
from gateway.incentives.config import validate_against
from gateway.incentives.stage import IncentiveStage

CASES = Path(__file__).resolve().parents[2] / "cases" / "incentives"


def _diagnostics(case: Path, data_dir: Path) -> list[Diagnostic]:
    try:
        site = load_site(case / "site.yaml")
    except ConfigError as exc:
        return exc.diagnostics
    problems = validate_against(site)
    if problems:
        return problems
    try:
        IncentiveStage.open(site, data_dir).close()
    except ConfigError as exc:
        return exc.diagnostics
    return []


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_broken_incentive_config_is_reported_at_its_position(case: str, tmp_path: Path) -> None:
    case_dir = CASES / case
    lines = [
        d.format().splitlines()[0].replace(str(case_dir) + os.sep, "").replace(str(tmp_path), "<data>")
        for d in _diagnostics(case_dir, tmp_path)
    ]
    expected = (case_dir / "expected.err").read_text(encoding="utf-8").splitlines()
    assert lines == expected
