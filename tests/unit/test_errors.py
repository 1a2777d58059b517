"""Task-group failures are turned back into the one GatewayError they stand for, on every Python 3.11."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from gateway.errors import ConfigError, Diagnostic, GatewayError, StoreError, leaf_exceptions, task_group_error


def _config_error(message: str) -> ConfigError:
    return ConfigError([Diagnostic("site.yaml", 1, 1, message)])


def test_one_gateway_error_however_nested_is_itself() -> None:
    refusal = StoreError("cannot open outbox")
    group = BaseExceptionGroup("outer", [ExceptionGroup("inner", [ExceptionGroup("", [refusal])])])
    assert task_group_error(group) is refusal


def test_several_config_errors_are_one_with_every_diagnostic() -> None:
    group = ExceptionGroup("", [_config_error("first"), ExceptionGroup("", [_config_error("second")])])
    merged = task_group_error(group)
    assert isinstance(merged, ConfigError)
    assert [d.message for d in merged.diagnostics] == ["first", "second"]


@pytest.mark.parametrize(
    "leaves",
    [
        [RuntimeError("a bug")],
        [StoreError("disk"), RuntimeError("a bug")],
        [StoreError("disk"), _config_error("bad")],  # two different failures: the traceback tells more
    ],
)
def test_anything_else_is_left_to_the_traceback(leaves: list[Exception]) -> None:
    assert task_group_error(ExceptionGroup("", leaves)) is None


def test_leaves_are_in_order() -> None:
    a, b, c = ValueError("a"), KeyError("b"), OSError("c")
    assert leaf_exceptions(BaseExceptionGroup("", [a, BaseExceptionGroup("", [b, c])])) == [a, b, c]
    assert leaf_exceptions(a) == [a]


async def test_a_refusal_raised_in_a_task_group_comes_out_as_itself() -> None:
    # the shape of Gateway.run: a TaskGroup whose task refuses; the caller catches the refusal by its own type
    async def refuse() -> None:
        raise StoreError("the disk refuses")

    async def run() -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(refuse())
                await asyncio.Event().wait()
        except BaseExceptionGroup as group:
            error = task_group_error(group)
            if error is None:
                raise
            raise error from None

    with pytest.raises(GatewayError, match="the disk refuses") as caught:
        await run()
    assert type(caught.value) is StoreError


# -- no new exception raised from inside `except*` -------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]

#: (file, function) that still raise a new exception inside `except*`, with who fixes it. On Python < 3.11.4 such an
#: exception leaves wrapped in an ExceptionGroup, so a caller's `except UplinkError` misses it.
KNOWN_RAISES_IN_EXCEPT_STAR: set[tuple[str, str]] = set()


def _raises_in_except_star() -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for package in ("gateway", "drivers", "rules"):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for function in ast.walk(tree):
                if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(function):
                    if isinstance(node, ast.TryStar) and any(
                        isinstance(inner, ast.Raise) and inner.exc is not None
                        for handler in node.handlers
                        for inner in ast.walk(handler)
                    ):
                        found.add((path.relative_to(REPO).as_posix(), function.name))
    return found


def test_no_new_exception_is_raised_from_inside_except_star() -> None:
    # use `except BaseExceptionGroup` and task_group_error instead (see gateway/errors.py); a bare `raise` is fine
    unexpected = _raises_in_except_star() - KNOWN_RAISES_IN_EXCEPT_STAR
    assert not unexpected, f"raise inside except* (wrapped in an ExceptionGroup before Python 3.11.4): {unexpected}"


@pytest.mark.parametrize(
    ("line", "echoed"),
    [
        ("    password: hunter2", '    password: "****"'),
        ('    password: "hu#nt,er2"  # old one', '    password: "****"  # old one'),
        ("  - {host: a, password: x y, port: '1883'}", "  - {host: a, password: \"****\", port: '1883'}"),
        ("    token: ${INFLUX_TOKEN}", '    token: "****"'),  # not literal, still not echoed
        ("    api_key: abc", '    api_key: "****"'),
        ("  'secret': 'it''s'", "  'secret': \"****\""),
        ('{"password":"x","a":1}', '{"password":"****","a":1}'),
        ("    token_file: /etc/edge-gateway/token", "    token_file: /etc/edge-gateway/token"),  # a path
        ("    password:", "    password:"),  # the value is on the next lines
        ("    password: |", "    password: |"),
        ("    passwords_seen: 3", "    passwords_seen: 3"),
    ],
)
def test_an_echoed_line_masks_secret_values(line: str, echoed: str) -> None:
    printed = Diagnostic("site.yaml", 1, 1, "problem", line).format().splitlines()
    assert printed[1] == "    " + echoed


def test_the_caret_moves_with_the_masked_text() -> None:
    line = "  - {id: b, password: a-very-long-password, port: '1883'}"
    printed = Diagnostic("site.yaml", 1, line.index("'1883'") + 1, "port: expected int", line).format().splitlines()
    assert printed[1][printed[2].index("^") :].startswith("'1883'")
    # inside the masked value: at its start
    printed = Diagnostic("site.yaml", 1, line.index("very") + 1, "problem", line).format().splitlines()
    assert printed[1][printed[2].index("^") :].startswith('"****"')


def test_a_warning_says_so() -> None:
    warning = Diagnostic("site.yaml", 3, 5, "literal secret", None, severity="warning")
    assert warning.format() == "site.yaml:3:5: warning: literal secret"


def test_the_caret_sits_under_its_column_after_a_tab() -> None:
    # a terminal expands a tab in the echoed line; a tab in the caret's line expands the same way
    line = "\t  port: x"
    printed = Diagnostic("site.yaml", 2, line.index("x") + 1, "port: expected int", line).format().splitlines()
    assert printed[1].expandtabs()[printed[2].expandtabs().index("^")] == "x"
