"""Fixtures of the platform-side integration tests."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest

#: what the handler below took in: (message, exception) of aiomqtt futures nobody retrieved
UNRETRIEVED: list[tuple[str, BaseException | None]] = []


@pytest.fixture(autouse=True)
async def _unretrieved_aiomqtt_futures() -> AsyncIterator[None]:
    """aiomqtt keeps a connection loss in a future that only its own calls await; the platform uplink publishes
    through paho and marks it retrieved itself (gateway/uplinks/mqtt.py, ``_session``). Left unretrieved, asyncio's
    "never retrieved" line, garbage-collected at pytest's exit, once met closed log streams inside an AST parse and
    crashed the run (SystemError, CPython 3.11.2). Such futures are recorded here instead of logged, and a test that
    leaves one fails; anything else goes to asyncio's default handler."""
    loop = asyncio.get_running_loop()

    def handler(running: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exception = context.get("exception")
        if isinstance(exception, aiomqtt.MqttError) and "never retrieved" in str(context.get("message")):
            UNRETRIEVED.append((str(context.get("message")), exception))
            return
        running.default_exception_handler(context)

    loop.set_exception_handler(handler)
    UNRETRIEVED.clear()
    yield
    gc.collect()
    left, UNRETRIEVED[:] = list(UNRETRIEVED), []
    assert not left, f"aiomqtt futures nobody retrieved: {left}"
