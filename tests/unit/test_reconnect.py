"""The shared reconnect policy (gateway/reconnect.py) on a fake clock: no test here sleeps."""

from __future__ import annotations

import logging

import pytest

from gateway.reconnect import ReconnectPolicy, RetryTiming


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def policy(clock: FakeClock, draw: float = 0.5, **timing: float) -> ReconnectPolicy:
    # draw 0.5 is the middle of the jitter band: the delay itself
    return ReconnectPolicy("dev", RetryTiming(**timing), clock=clock, random=lambda: draw)


def test_first_retry_is_fast_then_doubles_to_the_cap() -> None:
    clock = FakeClock()
    p = policy(clock, first=0.25, maximum=2.0)
    assert [p.failed("down") for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


def test_jitter_stays_inside_its_band() -> None:
    clock = FakeClock()
    low = policy(clock, draw=0.0, first=1.0, maximum=1.0, jitter=0.2)
    high = policy(clock, draw=0.999999, first=1.0, maximum=1.0, jitter=0.2)
    assert low.failed("x") == pytest.approx(0.8)
    assert high.failed("x") == pytest.approx(1.2, abs=1e-5)
    assert low.next_delay_bounds() == pytest.approx((0.8, 1.2))


def test_allows_only_after_the_wait() -> None:
    clock = FakeClock()
    p = policy(clock, first=0.5, maximum=4.0)
    assert p.allows()
    wait = p.failed("silent")
    assert not p.allows()
    clock.now += wait - 0.01
    assert not p.allows()
    clock.now += 0.01
    assert p.allows()


def test_success_resets_the_delay_and_reports_the_outage_length() -> None:
    clock = FakeClock()
    p = policy(clock, first=0.25, maximum=2.0)
    for _ in range(5):
        clock.now += p.failed("down")
    assert p.down and p.attempts == 5
    assert p.succeeded() == pytest.approx(0.25 + 0.5 + 1.0 + 2.0 + 2.0)
    assert not p.down and p.allows()
    assert p.failed("down again") == 0.25, "a new outage starts from the fast first retry"
    assert p.succeeded() == 0.0
    assert p.succeeded() is None, "success while connected ends no outage"


def test_recovery_is_bounded_by_the_cap_whatever_the_outage_length() -> None:
    """A device back at any moment of a long outage is retried within maximum * (1 + jitter) of it."""
    clock = FakeClock()
    p = policy(clock, draw=0.999999, first=0.25, maximum=2.0, jitter=0.2)
    back_at = clock.now + 20.0  # a 20 s outage, as in the field report
    while True:
        wait = p.failed("down")
        clock.now += wait
        if clock.now >= back_at:
            break
    assert clock.now - back_at <= 2.0 * 1.2
    assert p.succeeded() == pytest.approx(clock.now - 100.0)


def test_one_log_line_per_outage_and_one_per_recovery(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    p = policy(clock)
    caplog.set_level(logging.INFO, logger="gateway.reconnect")
    for _ in range(2):
        for _ in range(7):
            clock.now += p.failed("connection refused")
        clock.now += 1
        p.succeeded()
        p.succeeded()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("connection refused" in m for m in messages) == 2, messages
    assert sum("back after" in m for m in messages) == 2, messages
    assert len(messages) == 4


@pytest.mark.parametrize(
    ("timing", "message"),
    [
        ({"first": 0.0}, "0 < first <= maximum"),
        ({"first": 3.0, "maximum": 2.0}, "0 < first <= maximum"),
        ({"factor": 0.5}, "at least 1"),
        ({"jitter": 1.0}, "fraction"),
    ],
)
def test_bad_timings_are_refused(timing: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryTiming(**timing)
