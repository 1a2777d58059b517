"""Signed records with absurd numbers: verify reports them at once, and the platform's schema refuses them.

A faulty or hostile gateway signs whatever it likes; a ``lookback_days`` of 10**10 once made verify walk back that
many days (a full test run hung 20 minutes), and a ``seq`` of 2**62 made it build the set of every seq below.
The bounds are the gateway config's (``gateway/incentives/config.py``).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway.platform.messages import schema_problem
from tests.unit.incentives.test_verify2 import (
    ACCT_A,
    KEY,
    build,
    epoch,
    hang_guard,
    problems_of,
    programme,
    record_hash,
    sign,
    stream_bodies,
    where,
)

HUGE = 10**10
LIKE_DAYS = f"account {ACCT_A}: baseline"


def _with_baseline(**changes: int) -> list[dict[str, Any]]:
    body = programme()
    body["accounts"][0]["baseline"].update(changes)  # account A's like-days baseline
    return build([epoch(body), *stream_bodies()[1:]])


def _timed_problems(records: list[dict[str, Any]]) -> list[str]:
    started = time.monotonic()
    with hang_guard():
        problems = problems_of(records)
    assert time.monotonic() - started < 1.0
    return problems


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"lookback_days": HUGE}, f"{LIKE_DAYS} lookback_days is {HUGE}, not an integer in the allowed range 1..366"),
        ({"lookback_days": 367}, f"{LIKE_DAYS} lookback_days is 367, not an integer in the allowed range 1..366"),
        ({"days": HUGE}, f"{LIKE_DAYS} days is {HUGE}, not an integer in the allowed range 1..60"),
        ({"days": 61}, f"{LIKE_DAYS} days is 61, not an integer in the allowed range 1..60"),
        # the programme's days is 2
        ({"min_days": HUGE}, f"{LIKE_DAYS} min_days is {HUGE}, not an integer in the allowed range 1..2"),
        ({"min_days": 3}, f"{LIKE_DAYS} min_days is 3, not an integer in the allowed range 1..2"),
    ],
)
def test_a_like_days_number_beyond_the_config_bounds_is_reported_at_once(changes: dict[str, int], problem: str) -> None:
    records = _with_baseline(**changes)
    assert _timed_problems(records)[0] == f"{where(records, 1)}: malformed: {problem}"


@pytest.mark.parametrize(
    ("interval_s", "problem"),
    [
        (HUGE, f"interval_s is {HUGE}, not an integer in the allowed range 60..86400"),
        (59, "interval_s is 59, not an integer in the allowed range 60..86400"),
        (700, "interval_s 700 does not divide a day (86400 s)"),
    ],
)
def test_an_interval_beyond_the_config_bounds_is_reported_at_once(interval_s: int, problem: str) -> None:
    records = build([epoch(programme(interval_s=interval_s)), *stream_bodies()[1:]])
    assert _timed_problems(records)[0] == f"{where(records, 1)}: malformed: {problem}"


def test_the_largest_bounds_verify_clean() -> None:
    """The stream holds three days, so the widest like-days search finds the same days as the usual one."""
    assert _timed_problems(_with_baseline(days=60, lookback_days=366)) == []
    assert _timed_problems(build([epoch(programme(interval_s=60))])) == []
    assert _timed_problems(build([epoch(programme(interval_s=86_400))])) == []


def test_a_signed_seq_of_2_to_the_62_is_a_gap_not_a_hang() -> None:
    records = build(stream_bodies())
    records[3]["seq"] = 2**62
    records[3]["signature"] = sign(records[3], KEY)
    for later in range(4, len(records)):
        records[later]["prev_hash"] = record_hash(records[later - 1])
        records[later]["signature"] = sign(records[later], KEY)
    problems = _timed_problems(records)
    last = len(records)
    assert f"gap: seq 4, {last + 1}..{2**62 - 1} missing ({2**62 - last} record(s))" in problems


@pytest.mark.parametrize(
    ("changes", "accepted"),
    [
        ({"lookback_days": 366, "days": 60, "min_days": 60}, True),
        ({"lookback_days": 367}, False),
        ({"lookback_days": HUGE}, False),
        ({"days": 61}, False),
        ({"min_days": 61}, False),
    ],
)
def test_the_platform_schema_holds_the_same_maximum(changes: dict[str, int], accepted: bool) -> None:
    """The platform receiver checks every incentive body against this schema before it runs verify."""
    genesis = _with_baseline(**changes)[0]
    assert (schema_problem("incentive-record.schema.json", genesis) is None) is accepted


@pytest.mark.parametrize(("interval_s", "accepted"), [(60, True), (86_400, True), (59, False), (86_401, False)])
def test_the_platform_schema_bounds_the_interval(interval_s: int, accepted: bool) -> None:
    genesis = build([epoch(programme(interval_s=interval_s))])[0]
    assert (schema_problem("incentive-record.schema.json", genesis) is None) is accepted
