"""Property: whatever readings arrive (gaps, wraps, duplicates, shuffled or late), the issued intervals' energies add
up exactly to the meter's true consumption between the first and the last reading used, and no incomplete interval
ever carries a saving."""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from decimal import Decimal
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.config.site import Site
from gateway.incentives.stage import IncentiveStage
from gateway.model import Sample
from tests.unit.incentives.helpers import NS, T0, make_site

WRAP_MICRO = 2**16 * 10_000  # counter: {bits: 16, resolution_kwh: 0.01} wraps at 655.36 kWh
POINT = "apt1.energy_kwh"
INCENTIVES = """
interval: 15min
edge_tolerance: 1min
max_delay: 30min
baseline: {method: fixed, kwh: 0.4}
emission_factor: {kg_per_kwh: 0.5703}
counter: {bits: 16, resolution_kwh: 0.01}
max_power_kw: 100000   # a wrap is only counted when the implied power is plausible (else it is a reset)
signing_key_file: keys/signing.pem
pseudonym_key_file: keys/pseudonym.key
generate_missing_keys: true
accounts:
  - {id: "ACC-0001", meters: [apt1.energy_kwh]}
"""


@dataclass(frozen=True)
class Story:
    """Readings of one meter: true (unwrapped) micro-kWh at each time, and the order they reach the gateway."""

    times_ns: list[int]
    true_micro: list[int]
    arrival: list[list[int]]  # batches of indexes into times/true


@st.composite
def stories(draw: st.DrawFn) -> Story:
    if draw(st.booleans()):  # a meter polled regularly, with jitter: mostly complete intervals
        step = draw(st.integers(20, 90))
        count = draw(st.integers(2, 150))
        jitter = draw(st.lists(st.integers(0, 15), min_size=count, max_size=count))
        seconds = sorted({i * step + j for i, j in enumerate(jitter)})
        max_step = 30_000  # at most 0.03 kWh between readings: some intervals save against 0.4 kWh
    else:  # sparse and irregular: mostly incomplete intervals
        seconds = sorted(draw(st.lists(st.integers(0, 3 * 3600), min_size=1, max_size=60, unique=True)))
        max_step = 2_000_000
    steps = draw(st.lists(st.integers(0, max_step), min_size=len(seconds), max_size=len(seconds)))
    # often just below the top of the counter, so it wraps
    start = draw(st.one_of(st.integers(WRAP_MICRO - 5_000_000, WRAP_MICRO - 1), st.integers(0, WRAP_MICRO - 1)))
    true, total = [], start
    for step in steps:  # at most 120 kWh in all: far below half the wrap, so a wrap is never mistaken for a reset
        total += step
        true.append(total)
    order = list(range(len(seconds)))
    shuffler = random.Random(draw(st.integers(0, 2**32)))
    window = draw(st.integers(1, 6))
    for i in range(0, len(order), window):  # shuffle within windows: readings arrive late and out of order
        chunk = order[i : i + window]
        shuffler.shuffle(chunk)
        order[i : i + window] = chunk
    for _ in range(draw(st.integers(0, 5))):  # and some twice
        order.insert(shuffler.randrange(len(order) + 1), shuffler.choice(order))
    size = draw(st.integers(1, 5))
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    return Story([T0 + s * NS for s in seconds], true, batches)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return make_site(tmp_path_factory.mktemp("prop"), INCENTIVES)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(story=stories())
def test_interval_energies_add_up_and_incomplete_never_saves(site: Site, story: Story) -> None:
    with tempfile.TemporaryDirectory() as data:
        stage = IncentiveStage.open(site, Path(data))
        try:
            records = []
            for batch in story.arrival:
                samples = [Sample(POINT, (story.true_micro[i] % WRAP_MICRO) / 1e6, story.times_ns[i]) for i in batch]
                records += [e.body for e in stage.process(samples)]
            records += [e.body for e in stage.tick(story.times_ns[-1] + 2 * 3600 * NS)]
        finally:
            stage.close()

    true_at = dict(zip(story.times_ns, story.true_micro, strict=True))
    starts = [r["interval"]["start"] for r in records]
    assert len(starts) == len(set(starts)), "an interval was issued twice"
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    for before, after in pairwise(records):
        assert before["meters"][0]["end"] == after["meters"][0]["start"], "consecutive intervals share their edge"

    first_reading, last_reading = records[0]["meters"][0]["start"], records[-1]["meters"][0]["end"]
    first_ts, last_ts = (_ns(first_reading["ts"]), _ns(last_reading["ts"]))
    issued_micro = sum(int(Decimal(r["energy_kwh"]) * 1_000_000) for r in records)
    assert issued_micro == true_at[last_ts] - true_at[first_ts]

    event(f"wrapped: {any('rollover' in r['notes'] for r in records)}")
    event(f"has incomplete: {any(not r['complete'] for r in records)}")
    event(f"has saving: {any(r['status'] == 'saving' for r in records)}")
    for record in records:
        if not record["complete"]:
            assert record["saving_kwh"] == "0.000000" and record["status"] == "incomplete"
        assert record["status"] != "discontinuity", "a wrap was mistaken for a reset"


def _ns(text: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()) * NS
