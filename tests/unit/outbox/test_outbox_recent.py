"""The outbox's recent rows (issue 19): live reads served from memory are exactly what the database holds."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.model import Quality, Sample
from gateway.outbox import RECENT_SAMPLES, Outbox


def batch(start: int, count: int = 10) -> list[Sample]:
    return [Sample(f"m{i % 3}.p{i}", float(i), 1_000 + i, Quality.GOOD) for i in range(start, start + count)]


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
samples = st.builds(
    Sample,
    st.sampled_from(["m1.power_kw", "m1.energy_kwh", "m2.state", "m3.note"]),
    values,
    st.integers(min_value=0, max_value=2**62),
    st.sampled_from(list(Quality)),
    st.one_of(st.none(), st.sampled_from(["no_answer", "link_down", "exception_2"])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(samples, min_size=1, max_size=6), min_size=1, max_size=8), data=st.data())
def test_a_live_read_from_memory_equals_the_database_read(
    tmp_path: Path, batches: list[list[Sample]], data: st.DataObject
) -> None:
    """Whatever the values (NaN, infinity, None, bools, 64-bit ints, text) and whatever the read's bounds: a read
    through the outbox that appended (memory) equals one through a second outbox on the same file (the database)."""
    path = tmp_path / f"outbox-{data.draw(st.integers(0, 2**32))}.db"

    async def scenario() -> None:
        outbox = Outbox(path)
        try:
            for each in batches:
                await outbox.append(each)
            after = data.draw(st.integers(0, len(batches)))
            upto = data.draw(st.one_of(st.none(), st.integers(after, len(batches))))
            max_samples = data.draw(st.integers(1, 60))
            live = outbox.read_telemetry_upto(after, upto_seq=upto, max_samples=max_samples)
            disk = Outbox(path)
            try:
                stored = disk.read_telemetry_upto(after, upto_seq=upto, max_samples=max_samples)
            finally:
                await disk.close()
            # the same rows, seqs, times and samples; NaN compares unequal to itself, so compare its repr
            assert [(b.seq, b.created_ns, repr(b.samples)) for b in live] == [
                (b.seq, b.created_ns, repr(b.samples)) for b in stored
            ]
        finally:
            await outbox.close()

    asyncio.run(scenario())


async def test_live_rows_come_from_memory_and_a_row_with_nan_from_the_database(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    await outbox.append(batch(0))
    await outbox.append([Sample("m1.p", math.nan, 5, Quality.GOOD), Sample("m1.q", math.inf, 5, Quality.GOOD)])
    first, second = outbox.read_telemetry_upto(0, upto_seq=None, max_samples=100)
    assert first is outbox._recent[1]  # served from memory, not decoded again
    assert 2 not in outbox._recent  # JSON has no NaN: the row reads back None, so memory must not say NaN
    assert [s.value for s in second.samples] == [None, None]
    await outbox.close()


async def test_memory_is_bounded_and_older_rows_come_from_the_database(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    per = 1_000
    for i in range(RECENT_SAMPLES // per + 5):
        await outbox.append(batch(i * per, per))
    assert outbox._recent_samples <= RECENT_SAMPLES
    assert 1 not in outbox._recent
    rows = outbox.read_telemetry_upto(0, upto_seq=None, max_samples=3 * per)
    assert [r.seq for r in rows] == [1, 2, 3]
    assert [s.value for s in rows[0].samples] == [float(i) for i in range(per)]
    await outbox.close()


async def test_rows_the_budget_dropped_are_never_served_from_memory(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db", telemetry_budget=2_000)
    for i in range(20):
        await outbox.append(batch(i * 10))
    assert outbox.stats.dropped_samples > 0
    rows = outbox.read_telemetry_upto(0, upto_seq=None, max_samples=1_000)
    disk_first = outbox._reader.execute("SELECT min(seq) FROM telemetry").fetchone()[0]
    assert rows[0].seq == disk_first > 1  # what the database still holds, from its oldest row
    assert all(r.seq > outbox._dropped_upto for r in rows)
    await outbox.close()
