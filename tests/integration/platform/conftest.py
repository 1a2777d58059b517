"""Fixtures of the platform-side integration tests."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _collect_unretrieved_futures() -> Iterator[None]:
    """aiomqtt leaves a future holding "Unexpected disconnection" unretrieved when a broker node dies under an
    uplink (gateway/uplinks/mqtt.py). Collected at pytest's exit, asyncio's "never retrieved" line met a closed log
    stream inside an AST parse and crashed the run (CPython 3.11.2). Collected here, after the test's event loop is
    gone, the line goes to the test's log."""
    yield
    gc.collect()
