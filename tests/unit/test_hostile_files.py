"""Hostile files (issue 12): an alias bomb, a deeply nested or a huge file is refused in bounded time and memory,
by ``check`` and ``rules check`` as real processes under a memory limit, and by the loader every file goes through.

A reload of such a rule file is in tests/unit/rules/test_rules_runtime.py, beside the other reload tests.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.config.source import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, load_yaml
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SITE_CASES = ROOT / "tests" / "cases" / "config"
RULE_CASES = ROOT / "tests" / "cases" / "rules" / "broken"
#: the limits a hostile file must be refused within (the unbounded loader took 34 s and 1.5 GB on 12 lines)
MEMORY_LIMIT = 512 * 1024**2
TIME_LIMIT_S = 10.0

BILLION_LAUGHS = "version: 1\n" + "".join(
    f"l{i}: &a{i} [{', '.join([f'*a{i - 1}' if i else 'lol'] * 10)}]\n" for i in range(10)
)


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _run(*args: str | Path) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT_S * 3,  # a hang fails here; the assertion below is the real bound
        preexec_fn=_limited,  # in the child before exec: only the checked command is limited
        cwd=ROOT,
        check=False,
    )
    return proc, time.monotonic() - started


def _diagnostic_heads(stderr: str, path: Path) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{path}:") and not line.endswith("error(s)")]


@pytest.mark.parametrize(
    ("command", "path", "message"),
    [
        ("check", SITE_CASES / "alias_bomb" / "site.yaml", ":3:7: YAML anchors and aliases are not allowed"),
        ("check", SITE_CASES / "deep_nesting" / "site.yaml", f":4:129: nested more than {MAX_DEPTH} levels deep"),
        ("rules check", RULE_CASES / "alias_bomb.yaml", ":5:11: YAML anchors and aliases are not allowed"),
        ("rules check", RULE_CASES / "deep_nesting.yaml", f":66:131: nested more than {MAX_DEPTH} levels deep"),
    ],
)
def test_a_hostile_file_is_refused_fast_in_little_memory(command: str, path: Path, message: str) -> None:
    proc, elapsed = _run(*command.split(), path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert _diagnostic_heads(proc.stderr, path) == [f"{path}{message}" + _rest(message)]
    assert elapsed < TIME_LIMIT_S
    assert "Traceback" not in proc.stderr


def _rest(message: str) -> str:
    return " (they can expand without limit)" if "aliases" in message else ""


def test_billion_laughs_written_by_hand_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lol.yaml"
    path.write_text(BILLION_LAUGHS)
    proc, elapsed = _run("rules", "check", path)
    assert proc.returncode == 1
    assert _diagnostic_heads(proc.stderr, path) == [
        f"{path}:2:5: YAML anchors and aliases are not allowed (they can expand without limit)"
    ]
    assert elapsed < TIME_LIMIT_S


def test_a_too_big_file_is_refused_unread_with_its_size(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("version: 1\n" + "# padding\n" * (MAX_FILE_BYTES // 10))
    size = path.stat().st_size
    proc, elapsed = _run("check", path)
    assert proc.returncode == 1
    assert _diagnostic_heads(proc.stderr, path) == [
        f"{path}: file is 1.0 MiB ({size} bytes); config files are limited to 1 MiB"
    ]
    assert elapsed < TIME_LIMIT_S


def test_a_file_at_the_size_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    body = "a: 1\n"
    path.write_text(body + "#" * (MAX_FILE_BYTES - len(body)))
    assert load_yaml(path)[0] == {"a": 1}
    with pytest.raises(ConfigError, match="limited to 1 MiB"):
        load_yaml(path, text=path.read_text() + "#")


@pytest.mark.parametrize(
    ("text", "line", "col"),
    [
        ("a: &x 1\nb: 2\n", 1, 4),  # an anchor alone is refused: it is only there to be referenced
        ("a: 1\nb: *x\n", 2, 4),  # an alias alone (undefined, too)
        ("a: &x {k: 1}\nb:\n  <<: *x\n", 1, 4),  # merge keys reuse by alias: refused the same way
    ],
)
def test_anchors_and_aliases_are_refused_at_their_position(tmp_path: Path, text: str, line: int, col: int) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_yaml(path)
    [diagnostic] = caught.value.diagnostics
    assert (diagnostic.line, diagnostic.col) == (line, col)
    assert diagnostic.message.startswith("YAML anchors and aliases are not allowed (they can expand without limit)")


def test_nesting_up_to_the_limit_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    data, _ = load_yaml(path)
    depth = 0
    while isinstance(data, list):
        depth += 1
        data = data[0] if data else None
    assert depth == MAX_DEPTH
    path.write_text("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    with pytest.raises(ConfigError, match=f"nested more than {MAX_DEPTH} levels deep"):
        load_yaml(path)


def test_an_anchor_inside_a_profile_is_refused_through_the_site(tmp_path: Path) -> None:
    from gateway.config.site import load_site

    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "bomb.yaml").write_text("name: &n bomb\n")
    site = tmp_path / "sites" / "site.yaml"
    site.parent.mkdir()
    site.write_text(
        "version: 1\ngateway: {id: gw1, site: tower}\ndevices:\n  - {id: m1, driver: simulator, profile: bomb}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_site(site)
    heads = [d.format().splitlines()[0] for d in caught.value.diagnostics]
    assert f"{tmp_path / 'devices' / 'bomb.yaml'}:1:7: YAML anchors and aliases are not allowed" in heads[0]


def test_a_one_line_file_is_echoed_cut_around_the_column(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("a: [" + "1, " * 30_000 + "&x 2]\n")
    with pytest.raises(ConfigError) as caught:
        load_yaml(path)
    head, echo, caret = str(caught.value).splitlines()
    assert head == f"{path}:1:90005: YAML anchors and aliases are not allowed (they can expand without limit)"
    assert len(echo) < 200
    assert echo[caret.index("^") :].startswith("&x 2]")


def test_a_file_of_too_many_values_is_refused_at_the_first_one_over(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("x:\n" + "- 1\n" * MAX_NODES)  # the mapping, its key and the sequence count too
    with pytest.raises(ConfigError) as caught:
        load_yaml(path)
    [diagnostic] = caught.value.diagnostics
    assert (diagnostic.line, diagnostic.message) == (MAX_NODES - 1, f"more than {MAX_NODES} values in one file")


@pytest.mark.parametrize(
    "line",
    [
        "a" * 1_000_000,  # one word: no backtracking per column in the secret-key pattern
        "{" + "password: x," * 80_000,  # many secrets in one flow mapping
        "password: " + " " * 1_000_000 + "x",
    ],
)
def test_echoing_a_hostile_line_takes_linear_time(line: str) -> None:
    from gateway.errors import Diagnostic

    started = time.monotonic()
    text = Diagnostic("x.yaml", 1, 500_000, "problem", line).format()
    assert time.monotonic() - started < 2.0
    assert len(text) < 500
    assert "password: x" not in text
