"""Task-group failures are turned back into the one GatewayError they stand for, on every Python 3.11."""

from __future__ import annotations

import asyncio

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
