"""Golden replays: each folder under tests/cases/rules/golden/ holds a rule file, input samples (CSV), the extra
``rules test`` arguments and the expected report. The report is what ``edge-gateway rules test`` prints.

Regenerate after an intended change with ``UPDATE_GOLDEN=1 pytest tests/unit/rules/test_golden.py`` and review the
diff: the expected files are the specification.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

import pytest

from rules.cli import register

ROOT = Path(__file__).resolve().parents[3]
CASES = ROOT / "tests" / "cases" / "rules" / "golden"
DEMO_SITE = ROOT / "firmware_configs" / "sites" / "demo.yaml"


def _run_rules_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edge-gateway")
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_golden_replay(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    folder = CASES / case
    extra = shlex.split((folder / "args").read_text()) if (folder / "args").exists() else []
    argv = ["rules", "test", str(folder / "rules.yaml"), "--data", str(folder / "samples.csv")]
    code = _run_rules_cli([*argv, "--site", str(DEMO_SITE), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    expected_path = folder / "expected.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        expected_path.write_text(captured.out)
    assert captured.out == expected_path.read_text()
