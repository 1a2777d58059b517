"""Session-wide fixtures: the real services integration tests talk to, started on free ports."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.services import Mosquitto, VictoriaMetrics


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    if shutil.which("mosquitto") is None and not __import__("os").path.exists("/usr/sbin/mosquitto"):
        pytest.fail("mosquitto is not installed: run the README's test command, which installs it")
    broker = Mosquitto()
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def broker(mosquitto: Mosquitto) -> Iterator[Mosquitto]:
    """The session broker, guaranteed running at the start and end of each test (outage tests stop it)."""
    mosquitto.start()
    yield mosquitto
    mosquitto.start()


@pytest.fixture(scope="session")
def victoria() -> Iterator[VictoriaMetrics]:
    if shutil.which("victoria-metrics") is None:
        pytest.fail("victoria-metrics is not installed: run the README's test command, which installs it")
    tsdb = VictoriaMetrics()
    tsdb.start()
    try:
        yield tsdb
    finally:
        tsdb.close()


@pytest.fixture
def tsdb(victoria: VictoriaMetrics) -> Iterator[VictoriaMetrics]:
    victoria.start()
    yield victoria
    victoria.start()
