"""The live cache: typed history rings, their wrap-around, and no history when nothing reads it (from the start,
after a reader leaves, or with the status page off), with the freed rings handed back once per drop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.config.site import FIRMWARE_CONFIGS, load_site
from gateway.live import HistoryRing, LiveCache, release_freed_heap
from gateway.model import Quality, Sample
from gateway.supervisor import Gateway


def test_ring_keeps_the_newest_values_oldest_first_across_the_wrap() -> None:
    ring = HistoryRing(3)
    assert list(ring) == []
    for i in range(1, 8):
        ring.append(i * 1000, i / 2)
        # oldest first, at most 3, always ending with the newest
        expected = [(k * 1000, k / 2) for k in range(max(1, i - 2), i + 1)]
        assert list(ring) == expected
    assert len(ring) == 3
    assert ring.nbytes() >= 3 * 16


def test_cache_history_matches_the_samples_and_skips_strings_and_bad() -> None:
    cache = LiveCache(history=2)
    cache.watched()
    cache.update(
        [
            Sample("a.x", 1.5, 10, Quality.GOOD),
            Sample("a.flag", True, 10, Quality.GOOD),
            Sample("a.name", "on", 10, Quality.GOOD),
            Sample("a.dead", None, 10, Quality.BAD),
        ]
    )
    cache.update([Sample("a.x", 2, 20, Quality.GOOD), Sample("a.x", 3.25, 30, Quality.UNCERTAIN)])
    assert list(cache.history["a.x"]) == [(20, 2.0), (30, 3.25)]
    assert list(cache.history["a.flag"]) == [(10, 1.0)]
    assert set(cache.history) == {"a.x", "a.flag"}
    assert cache.values() == {"a.x": 3.25, "a.flag": True, "a.name": "on", "a.dead": None}
    latest = cache.get("a.x")
    assert latest is not None and latest.quality is Quality.UNCERTAIN
    assert cache.updates == 6


def test_without_history_only_the_latest_values_are_kept() -> None:
    cache = LiveCache(history=300)
    cache.watched()
    cache.update([Sample("a.x", 1.0, 10, Quality.GOOD)])
    assert len(cache.history["a.x"]) == 1
    cache.stop_history()  # the supervisor does this when the status page is off
    cache.update([Sample("a.x", 2.0, 20, Quality.GOOD), Sample("a.y", 5, 20, Quality.GOOD)])
    assert cache.history == {} and cache.history_len == 0
    assert cache.values() == {"a.x": 2.0, "a.y": 5}
    assert LiveCache(history=0).history_len == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Releases:
    """Counts the calls that hand freed rings back to the OS (the real one is glibc's malloc_trim)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def test_a_new_cache_keeps_no_history_until_its_first_reader() -> None:
    clock, releases = FakeClock(), Releases()
    cache = LiveCache(history=10, clock=clock, release=releases)
    for ts in range(1, 4):
        cache.update([Sample("a.x", float(ts), ts, Quality.GOOD)])
        clock.now += 1000.0
    assert cache.history == {} and cache.history_len == 0
    assert cache.values() == {"a.x": 3.0}  # what the page draws from until it has history
    assert releases.calls == 0  # nothing was built, so nothing is dropped
    cache.watched()
    assert cache.history_len == 10
    cache.update([Sample("a.x", 4.0, 4, Quality.GOOD)])
    assert list(cache.history["a.x"]) == [(4, 4.0)]  # history begins with the first reader


def test_history_is_dropped_when_nobody_watches_and_rebuilt_when_someone_does() -> None:
    clock, releases = FakeClock(), Releases()
    cache = LiveCache(history=10, unwatched_after=600.0, clock=clock, release=releases)
    cache.watched()
    cache.update([Sample("a.x", 1.0, 1, Quality.GOOD)])
    clock.now += 599.0
    cache.update([Sample("a.x", 2.0, 2, Quality.GOOD)])
    assert list(cache.history["a.x"]) == [(1, 1.0), (2, 2.0)]  # watched within the last 10 minutes
    assert releases.calls == 0
    clock.now += 2.0
    cache.update([Sample("a.x", 3.0, 3, Quality.GOOD)])
    assert cache.history == {} and cache.history_len == 0  # 601 s without a reader: the rings are freed
    assert releases.calls == 1  # and handed back to the OS, once
    clock.now += 600.0
    cache.update([Sample("a.x", 3.5, 4, Quality.GOOD)])
    assert releases.calls == 1  # still unwatched: nothing more to drop, nothing more to release
    assert cache.values() == {"a.x": 3.5}
    cache.watched()  # the page is opened: history starts again from the next reading
    assert cache.history_len == 10
    cache.update([Sample("a.x", 4.0, 4, Quality.GOOD)])
    assert list(cache.history["a.x"]) == [(4, 4.0)]
    clock.now += 300.0
    cache.watched()
    clock.now += 300.0
    cache.update([Sample("a.x", 5.0, 5, Quality.GOOD)])
    assert list(cache.history["a.x"]) == [(4, 4.0), (5, 5.0)]  # read 300 s ago: kept
    clock.now += 601.0
    cache.update([Sample("a.x", 6.0, 6, Quality.GOOD)])
    assert cache.history == {} and releases.calls == 2  # the second drop releases once more


def test_stopping_history_releases_only_what_was_kept() -> None:
    releases = Releases()
    cache = LiveCache(history=10, release=releases)
    cache.stop_history()  # never watched: no rings, nothing to release
    assert releases.calls == 0
    watched = LiveCache(history=10, release=releases)
    watched.watched()
    watched.update([Sample("a.x", 1.0, 1, Quality.GOOD)])
    watched.stop_history()
    watched.stop_history()
    assert watched.history == {} and releases.calls == 1


def test_the_real_release_runs_wherever_the_tests_do() -> None:
    """glibc's malloc_trim where the C library has it, nothing elsewhere: it must never raise."""
    cache = LiveCache(history=300)
    cache.watched()
    cache.update([Sample(f"d.p{i}", float(i), 1, Quality.GOOD) for i in range(1000)])
    assert len(cache.history) == 1000
    cache.stop_history()
    assert cache.history == {} and cache.values()["d.p999"] == 999.0
    release_freed_heap()  # twice in a row is harmless too


def test_watching_does_not_restart_a_history_the_supervisor_stopped() -> None:
    cache = LiveCache(history=10)
    cache.stop_history()
    cache.watched()
    cache.update([Sample("a.x", 1.0, 1, Quality.GOOD)])
    assert cache.history == {} and cache.history_len == 0


def test_a_negative_depth_is_refused() -> None:
    with pytest.raises(ValueError, match="history must be 0"):
        LiveCache(history=-1)


async def test_a_gateway_without_its_status_page_keeps_no_history(tmp_path: Path) -> None:
    """Nothing can read the sparklines' history when the HTTP server is off: the supervisor turns it off."""
    gateway = Gateway(load_site(FIRMWARE_CONFIGS / "sites" / "demo.yaml"), data_dir=tmp_path, http_listen="off")
    assert gateway.live.history_len == 0  # nobody has looked yet
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    await asyncio.wait_for(gateway.started.wait(), 5)
    await asyncio.sleep(1.2)  # a poll of every simulated device
    stop.set()
    await asyncio.wait_for(runner, 5)
    gateway.live.watched()  # a reader (a test client serving this gateway) cannot bring the history back
    gateway.live.update([Sample("hall.temp", 20.5, 1, Quality.GOOD)])
    assert gateway.live.history_len == 0 and gateway.live.history == {}
    assert gateway.live.latest  # the latest values are still kept (`tail`, rules tests, /api/points)
