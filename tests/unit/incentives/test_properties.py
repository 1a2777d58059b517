"""Properties of the incentive stage over generated meter histories with injected faults (issue 11).

A meter's true counter is generated poll by poll (the truth is linear between true polls); the gateway receives
those readings through a fault model: gaps, outliers (a bad 0 or a x100 value), a counter reset, a frozen register,
a step back of the meter's own timestamps, late, duplicate, future-stamped and invalid readings, and gateway
restarts. A second account's meter is never faulty. Whatever the faults:

* the saving issued for an interval never exceeds the saving the true consumption earns, beyond what interpolating
  an edge between two real readings can move (the true energy inside the two pairs that straddle the edges, plus
  two micro-kWh of rounding), and beyond the error of a wrong reading that no validation can tell from a true one
  (a bad 0 just after a counter wrap); where a step of the meter's clock leaves no contradiction in the readings
  (stamps still rising, every advance plausible), the bound is the baseline less what the counter truly did
  between the first and last readings inside the interval;
* no (account, interval) is issued twice, ``seq`` has no gap, a record handed out twice is byte-identical;
* every interval adds up (energy is the sum of its meters; a saving only on an unflagged interval);
* the clean account's records are the same as in a run where the faulty meter had no fault at all.
"""

from __future__ import annotations

import itertools
import tempfile
from bisect import bisect_right
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.cli import main as cli_main
from gateway.incentives.record import Pseudonymizer, load_pseudonym_key, load_public_key
from gateway.incentives.stage import IncentiveStage
from gateway.incentives.verify import verify_lines
from gateway.model import Sample
from tests.unit.incentives.helpers import NS, T0, make_site

WRAP = 65_536_000  # counter: {bits: 16, resolution_kwh: 0.001} wraps at 65.536 kWh (micro-kWh)
FAULTY, CLEAN = "apt1.energy_kwh", "apt2.energy_kwh"
INTERVAL_NS = 15 * 60 * NS
BASELINE = 500_000  # 0.5 kWh per 15 minutes
INCENTIVES = """
interval: 15min
max_gap: 5min
settle: 1min
max_delay: 30min
netting: interval
baseline: {method: fixed, kwh: 0.5}
emission_factor: {kg_per_kwh: 0.5703}
counter: {bits: 16, resolution_kwh: 0.001}
max_power_kw: 10
signing_key_file: {keys}/incentive-signing.pem
pseudonym_key_file: {keys}/incentive-pseudonym.key
accounts:
  - {id: "ACC-0001", meters: [apt1.energy_kwh]}
  - {id: "ACC-0002", meters: [apt2.energy_kwh]}
"""


@dataclass
class Meter:
    """True polls: time (ns, real) and the unwrapped counter (micro-kWh)."""

    times: list[int]
    values: list[int]

    def __repr__(self) -> str:
        return f"Meter({len(self.times)} polls)"

    def at(self, t_ns: int) -> Fraction:
        """The true counter at ``t_ns`` (linear between polls)."""
        index = bisect_right(self.times, t_ns)
        if index == 0:
            return Fraction(self.values[0])
        if index == len(self.times):
            return Fraction(self.values[-1])
        t0, t1 = self.times[index - 1], self.times[index]
        v0, v1 = self.values[index - 1], self.values[index]
        return v0 + Fraction(v1 - v0) * (t_ns - t0) / (t1 - t0)


@dataclass
class Story:
    faulty: Meter
    clean: Meter
    #: (stamp shift for the faulty meter from this real time on, shift in ns), or None
    stamp_step: tuple[int, int] | None
    #: per delivery: list of (point, stamp, value) and the gateway's clock at delivery
    deliveries: list[tuple[list[tuple[str, int, Any]], int]] = field(default_factory=list)
    restarts: set[int] = field(default_factory=set)
    faults: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # hypothesis prints the falsifying example: a summary, not 30 kB of readings
        return f"Story(faults={self.faults}, stamp_step={self.stamp_step}, restarts={sorted(self.restarts)})"


@st.composite
def meters(draw: st.DrawFn, start_micro: int) -> Meter:
    step_s = draw(st.integers(20, 90))
    count = 90 * 60 // step_s
    jitter = draw(st.lists(st.integers(-5, 5), min_size=count, max_size=count))
    times = sorted({T0 + (i * step_s + j) * NS for i, j in enumerate(jitter)})
    # power between 0.2 and 4 kW, piecewise constant per poll: every poll advances by at least one counter step
    powers = draw(st.lists(st.integers(200, 4_000), min_size=len(times), max_size=len(times)))
    values = [start_micro]
    for (before, after), watts in zip(itertools.pairwise(times), powers, strict=False):
        advance = watts * (after - before) // 3_600_000_000
        values.append(values[-1] + max(1_000, advance - advance % 1_000))
    return Meter(times, values)


@st.composite
def stories(draw: st.DrawFn) -> Story:
    start = draw(st.sampled_from([10_000_000, WRAP - 1_500_000]))  # some start 1.5 kWh below the wrap
    faulty, clean = draw(meters(start)), draw(meters(20_000_000))
    faults = draw(
        st.lists(
            st.sampled_from(
                [
                    "gap",
                    "outlier_zero",
                    "outlier_high",
                    "reset",
                    "freeze",
                    "late",
                    "duplicate",
                    "future",
                    "invalid",
                    "stamp_step",
                    "restart",
                ]
            ),
            max_size=5,
        )
    )
    n = len(faulty.times)
    delivered: list[list[Any]] = [[FAULTY, t, v % WRAP] for t, v in zip(faulty.times, faulty.values, strict=True)]
    dropped: set[int] = set()
    extra: list[tuple[int, list[Any]]] = []  # (after index, reading)
    moved: dict[int, int] = {}
    story = Story(faulty, clean, None, faults=faults)
    for fault in faults:
        k = draw(st.integers(1, n - 2))
        if fault == "gap":
            dropped |= set(range(k, min(n - 1, k + draw(st.integers(1, 20)))))
        elif fault == "outlier_zero":
            delivered[k][2] = 0
        elif fault == "outlier_high":
            delivered[k][2] = delivered[k][2] * 100
        elif fault == "reset" and faulty.values[k - 1] % WRAP < WRAP - 1_000_000:  # near the wrap it looks like one
            for index in range(k, n):  # the register restarts from 0 at poll k
                delivered[index][2] = (faulty.values[index] - faulty.values[k]) % WRAP
        elif fault == "freeze":  # the register stops for longer than an interval, then catches up
            span = 20 * 60 * NS + draw(st.integers(0, 20)) * 60 * NS
            for index in range(k, n):
                if faulty.times[index] - faulty.times[k] > span:
                    break
                delivered[index][2] = delivered[k][2]
        elif fault == "late":
            moved[k] = min(n - 1, k + draw(st.integers(1, 40)))
        elif fault == "duplicate":
            extra.append((k, list(delivered[k])))
        elif fault == "future":
            extra.append((k, [FAULTY, faulty.times[k] + 86_400 * NS, delivered[k][2] + 1_000_000]))
        elif fault == "invalid":
            extra.append((k, [FAULTY, faulty.times[k] + 1, draw(st.sampled_from([float("nan"), 1e13, -1.0]))]))
        elif fault == "stamp_step" and story.stamp_step is None:
            shift = draw(st.integers(2, 30)) * 60 * NS
            story.stamp_step = (faulty.times[k], shift)
            for item in delivered[k:]:
                item[1] -= shift
        elif fault == "restart":
            story.restarts.add(k)
    # deliveries in real time: each true poll time, the readings due then (a late one arrives with a later poll)
    by_slot: dict[int, list[tuple[str, int, Any]]] = {}
    for index, item in enumerate(delivered):
        if index in dropped:
            continue
        slot = moved.get(index, index)
        by_slot.setdefault(slot, []).append(_value(item))
    for index, item in extra:
        by_slot.setdefault(index, []).append(_value(item))
    clean_at = {i: (CLEAN, t, v % WRAP) for i, (t, v) in enumerate(zip(clean.times, clean.values, strict=True))}
    last = max(len(faulty.times), len(clean.times))
    for slot in range(last):
        batch = list(by_slot.get(slot, []))
        clean_reading = clean_at.get(slot)
        real_now = max(faulty.times[min(slot, len(faulty.times) - 1)], clean.times[min(slot, len(clean.times) - 1)])
        if clean_reading is not None:
            batch.append((clean_reading[0], clean_reading[1], clean_reading[2] / 1_000_000))
        story.deliveries.append((batch, real_now))
    return story


def _value(item: list[Any]) -> tuple[str, int, Any]:
    value = item[2]
    return (item[0], item[1], value / 1_000_000 if isinstance(value, int) else value)


def run(story: Story, data: Path, site: Any, *, faults: bool) -> list[dict[str, Any]]:
    """Feed the story (or its fault-free version) to a stage; every record handed out, replays included."""
    stage = IncentiveStage.open(site, data)
    handed: list[dict[str, Any]] = []
    try:
        for slot, (batch, now) in enumerate(story.deliveries if faults else _clean(story)):
            if faults and slot in story.restarts:
                stage.close()
                stage = IncentiveStage.open(site, data)
            samples = [Sample(point, value, stamp) for point, stamp, value in batch]
            handed += [e.body for e in stage.process(samples, now) if e.type == "incentive"]
        end = story.deliveries[-1][1] + 2 * 3600 * NS
        handed += [e.body for e in stage.tick(end) if e.type == "incentive"]
    finally:
        stage.close()
    return handed


def _clean(story: Story) -> list[tuple[list[tuple[str, int, Any]], int]]:
    faulty = {
        i: (FAULTY, t, (v % WRAP) / 1_000_000)
        for i, (t, v) in enumerate(zip(story.faulty.times, story.faulty.values, strict=True))
    }
    out = []
    for slot, (batch, now) in enumerate(story.deliveries):
        clean = [item for item in batch if item[0] == CLEAN]
        out.append(([faulty[slot], *clean] if slot in faulty else clean, now))
    return out


def _wrapped_error(listed: int, true: Fraction) -> Fraction:
    """How far a listed counter value is from the true one, on the counter's wrapping scale."""
    error = abs(listed - true % WRAP)
    return min(error, WRAP - error)


def _micro(text: str) -> int:
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("-").partition(".")
    return sign * (int(whole) * 1_000_000 + int(frac))


def _ns(text: str) -> int:
    from datetime import datetime

    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(stamp.timestamp()) * NS + stamp.microsecond * 1000


def _real_times(story: Story, stamp: int) -> list[int]:
    """The real times one of the faulty meter's stamps can stand for: itself, and after a step also the stamp plus
    the shift (a stamp before the step can equal a stepped one, both being whole seconds)."""
    if story.stamp_step is None:
        return [stamp]
    at, shift = story.stamp_step
    times = set(story.faulty.times)
    candidates = [t for t in (stamp, stamp + shift) if t in times and (t < at) == (t == stamp)]
    return candidates or [stamp]


def _frame(story: Story, stamps: list[int]) -> int | None:
    """How far the faulty meter's stamps lag real time for these readings: 0 before a timestamp step, its size
    after it, None when they come from both sides (such an interval must not pay)."""
    if story.stamp_step is None:
        return 0
    at, shift = story.stamp_step
    before = {t for t in story.faulty.times if t < at}
    after = {t - shift for t in story.faulty.times if t >= at}
    if all(t in before for t in stamps):
        return 0
    if all(t in after for t in stamps):
        return shift
    return None


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # the draws' repr is long, not wrong
# derandomize: CI runs the same 60 examples every time (a few seconds). Random seeds find more: run by hand with
#   pytest tests/unit/incentives/test_properties.py -p no:cacheprovider --hypothesis-seed=N
# after raising max_examples and dropping derandomize (shrinking off, phases=[explicit, reuse, generate], shows a
# failure at once). 2026-12-03, seeds 1-60 x 500 examples: what once looked like minutes spent inside _issue was
# hypothesis shrinking real failures; six were found (an edge outlier judged twice, an outlier sizing a first
# allocation, a stuck register paid across a clock step, an allocation beyond what an interval holds, a clock step
# hidden by a counter wrap, a clock mark on an edge reading), each fixed in gateway/incentives/ with a deterministic
# regression test in test_energy.py; with the final code seeds 6, 11, 28 and 37-60 pass.
@settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(story=stories())
def test_no_fault_pays_more_than_the_true_saving_or_issues_twice(story: Story) -> None:
    for fault in story.faults:
        event(fault)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assert cli_main(["keys", "generate", "--out", str(root / "keys")]) == 0  # both runs share keys and pseudonyms
        site = make_site(root, INCENTIVES.replace("{keys}", str(root / "keys")))
        public_key = load_public_key(root / "keys" / "incentive-signing.pub.pem")
        faulty_account = Pseudonymizer(load_pseudonym_key(root / "keys" / "incentive-pseudonym.key")).account(
            "ACC-0001"
        )
        handed = run(story, root / "faulty", site, faults=True)
        reference = run(story, root / "clean", site, faults=False)

    # handed out more than once only byte-identically (replays after a restart); seq without gaps
    by_id: dict[str, dict[str, Any]] = {}
    for record in handed:
        assert by_id.setdefault(record["id"], record) == record
    issued = sorted(by_id.values(), key=lambda r: r["seq"])
    assert [r["seq"] for r in issued] == list(range(1, len(issued) + 1))
    intervals = [r for r in issued if r["kind"] == "interval"]
    keys = [(r["account"], r["interval"]["start"]) for r in intervals]
    assert len(keys) == len(set(keys)), "an (account, interval) was issued twice"
    # every record re-derives under the independent verifier (readings, flags, figures, chain)
    report = verify_lines([orjson.dumps(r) for r in issued], [public_key])
    assert report.problems == [], report.problems[:5]

    paid = 0
    for record in intervals:
        energy = _micro(record["energy_kwh"])
        assert energy == sum(_micro(m["kwh"]) for m in record["meters"])
        saving = _micro(record["saving_kwh"])
        assert saving == 0 or (record["status"] == "measured" and not record["flags"])
        if saving == 0:
            continue
        meter = story.faulty if record["account"] == faulty_account else story.clean
        start, end = _ns(record["interval"]["start"]), _ns(record["interval"]["end"])
        stamps = [_ns(r["ts"]) for r in record["meters"][0]["readings"]]
        shift = _frame(story, stamps) if meter is story.faulty else 0
        # each listed reading back at its real time (the faulty meter's stamps lag by the step after it); where a
        # stamp could stand for two times, the one that makes the bound below looser is taken
        times = [[t + shift] for t in stamps] if shift is not None else [_real_times(story, t) for t in stamps]
        real = [min(options) for options in times]
        # A wrong reading that its neighbours cannot tell from a true one (a bad 0 just after the counter wrapped is
        # a plausible value) passes validation, as it would in any VEE: at an edge it moves the interpolated edge
        # value by at most its own error. That error is part of the bound; for a true reading it is 0.
        listed = [_micro(r["kwh"]) for r in record["meters"][0]["readings"]]
        edges = {0, 1, len(listed) - 2, len(listed) - 1}
        edge_error = sum(min(_wrapped_error(listed[i], meter.at(t)) for t in times[i]) for i in edges)
        if edge_error:
            event("a plausible wrong reading at an edge")
        if shift is not None:
            true_energy = meter.at(end + shift) - meter.at(start + shift)
            slack = (meter.at(real[1]) - meter.at(real[0])) + (meter.at(real[-1]) - meter.at(real[-2]))
            earned = max(Fraction(0), BASELINE - true_energy)
            assert saving <= earned + slack + edge_error + 2, (record["interval"], saving, float(earned), float(slack))
        else:
            # Readings from both sides of a step of the meter's clock that no reading contradicts (its stamps still
            # rise and every advance is plausible, e.g. the readings that would overlap were lost in a gap): no
            # validation can see it. The energy measured is still at least what the counter did between the first
            # and the last reading inside the interval (a counter only rises), so that bounds the saving.
            event("paid across a clock step no reading contradicts")
            assert len(real) >= 4, "a paid interval has readings inside it"
            inside = meter.at(min(times[-2])) - meter.at(max(times[1]))
            assert saving <= max(Fraction(0), BASELINE - inside) + edge_error + 2, (record["interval"], saving)
        paid += 1
    event(f"paid intervals: {min(paid, 5)}{'+' if paid >= 5 else ''}")  # the bound above is exercised, not vacuous
    event(f"flagged intervals of the faulty meter: {min(sum(bool(r['flags']) for r in intervals), 3)}")

    # the clean account's records do not depend on the other meter's faults (chain fields aside)
    assert _view(issued, faulty_account) == _view(reference, faulty_account)


_CHAIN = {"seq", "prev_hash", "signature"}


def _view(records: list[dict[str, Any]], faulty_account: str) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in r.items() if k not in _CHAIN}
        for r in records
        if r["kind"] == "interval" and r["account"] != faulty_account
    ]
