"""The supervisor: start-up, ordered shutdown that stores everything read, crash isolation, the command router."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config.site import FIRMWARE_CONFIGS, Site, load_site
from gateway.driver_api import BatchSink, DeviceStatus
from gateway.errors import ConfigError, StoreError, WriteRejected
from gateway.model import Command, Quality, Sample
from gateway.outbox import Outbox
from gateway.reconnect import RetryTiming
from gateway.registry import PointInfo
from gateway.supervisor import STAGE_RECOVERY_SECONDS, STOP_STORE_GRACE_SECONDS, Gateway
from tests.unit.uplinks.helpers import FakeClock


async def _until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Let the gateway's tasks (and the outbox's writer thread) run until ``condition`` holds."""
    for _ in range(int(seconds * 1000)):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


def _demo() -> Site:
    return load_site(FIRMWARE_CONFIGS / "sites" / "demo.yaml")


async def _stored(path: Path) -> list[Sample]:
    outbox = Outbox(path)
    try:
        return [s for batch in outbox.read_telemetry(0, limit=1_000_000) for s in batch.samples]
    finally:
        await outbox.close()


async def test_every_sample_read_before_stop_is_in_the_store(tmp_path: Path) -> None:
    site = _demo()
    gateway = Gateway(site, data_dir=tmp_path, http_listen="off")
    published: list[Sample] = []
    gateway.bus.tap(published.extend)
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    await asyncio.wait_for(gateway.started.wait(), 5)
    await asyncio.sleep(1.2)
    stop.set()
    await asyncio.wait_for(runner, 2)

    stored = await _stored(tmp_path / "outbox.db")
    assert {(s.point, s.ts) for s in stored} == {(s.point, s.ts) for s in published}
    physical = {point for point, info in site.registry.items() if info.physical}
    assert physical <= {s.point for s in stored}  # every simulated point produced samples
    assert all(s.quality is Quality.GOOD for s in stored)


class ScriptedSource:
    """A source that reports what it saw and publishes one last batch after it is told to stop."""

    name = "scripted"

    def __init__(self, log: list[str], *, crash_first: bool = False) -> None:
        self.log = log
        self.crash_first = crash_first
        self.runs = 0

    @property
    def devices(self) -> frozenset[str]:
        return frozenset({"probe"})

    async def run(self, publish: BatchSink, stopping: asyncio.Event) -> None:
        self.runs += 1
        if self.crash_first and self.runs == 1:
            raise RuntimeError("bug in a driver")
        await publish([Sample("probe.value", 1.0, time.time_ns())])
        await stopping.wait()
        self.log.append("source saw stop")
        await publish([Sample("probe.value", 2.0, time.time_ns())])  # read during shutdown: must be kept
        self.log.append("source published last batch")

    async def write(self, command: Command) -> None:
        self.log.append(f"write {command.point}")

    def status(self) -> list[DeviceStatus]:
        return [DeviceStatus("probe", "scripted")]


def _probe_site(tmp_path: Path) -> Site:
    path = tmp_path / "site.yaml"
    path.write_text("version: 1\ngateway: {id: gw1, site: lab}\nhttp: {enabled: false}\n")
    return load_site(path)


async def test_shutdown_stops_drivers_first_and_stores_their_last_batch(tmp_path: Path) -> None:
    log: list[str] = []
    gateway = Gateway(_probe_site(tmp_path), data_dir=tmp_path / "data", sources=[ScriptedSource(log)])
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    await asyncio.wait_for(gateway.started.wait(), 5)
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(runner, 2)
    assert log == ["source saw stop", "source published last batch"]
    values = [s.value for s in await _stored(tmp_path / "data" / "outbox.db")]
    assert values == [1.0, 2.0]


#: restart delays apart from the ticker's 1 s waits on the same fake clock
RESTART = RetryTiming(first=3.0, maximum=24.0, jitter=0.1)


def _restart_waits(clock: FakeClock) -> list[float]:
    return [w for w in clock.waits if w > 2.0]


async def test_a_crashing_source_is_restarted_after_its_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = ScriptedSource([], crash_first=True)
    clock = FakeClock(auto_advance=True)  # a wait nothing cuts short jumps the clock instead of sleeping
    site = _probe_site(tmp_path)
    gateway = Gateway(site, data_dir=tmp_path / "data", sources=[source], clock=clock, restart_timing=RESTART)
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    await asyncio.wait_for(gateway.started.wait(), 5)
    await _until(lambda: source.runs >= 2)
    stop.set()
    await asyncio.wait_for(runner, 3)
    assert source.runs == 2
    [wait] = _restart_waits(clock)
    assert 2.7 <= wait <= 3.3
    assert f"scripted crashed; restarting in {wait:.1f} s" in caplog.text


class CrashingSource(ScriptedSource):
    """Crashes on every run, after working for ``lasts[run]`` seconds of the fake clock."""

    def __init__(self, clock: FakeClock, lasts: list[float]) -> None:
        super().__init__([])
        self.clock = clock
        self.lasts = lasts

    async def run(self, publish: BatchSink, stopping: asyncio.Event) -> None:
        self.clock.advance(self.lasts[self.runs] if self.runs < len(self.lasts) else 0.0)
        self.runs += 1
        raise RuntimeError(f"bug number {self.runs}")


async def test_restarts_back_off_while_a_source_keeps_crashing_and_start_over_after_a_long_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.supervisor")
    clock = FakeClock(auto_advance=True)
    source = CrashingSource(clock, lasts=[0, 0, 0, 0, 0, 25.0, 0])  # the sixth run works longer than the maximum
    site = _probe_site(tmp_path)
    gateway = Gateway(site, data_dir=tmp_path / "data", sources=[source], clock=clock, restart_timing=RESTART)
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    await asyncio.wait_for(gateway.started.wait(), 5)
    await _until(lambda: source.runs >= 8)  # seven restarts, each after its wait
    stop.set()
    await asyncio.wait_for(runner, 3)
    waits = _restart_waits(clock)[:7]
    expected = [3.0, 6.0, 12.0, 24.0, 24.0, 3.0, 6.0]  # doubling to the cap; the long run resets the delay
    assert all(0.9 * e <= w <= 1.1 * e for w, e in zip(waits, expected, strict=True)), waits
    # one line when a crash loop starts and one when it is over, not one per restart (each crash logs its traceback)
    assert caplog.text.count("scripted restarts: crashed; retrying in the background") == 2
    assert caplog.text.count("scripted restarts: back after") == 1
    assert caplog.text.count("scripted crashed; restarting in") >= 7


async def test_writes_are_refused_without_an_allowlist(tmp_path: Path) -> None:
    log: list[str] = []
    gateway = Gateway(_probe_site(tmp_path), data_dir=tmp_path / "data", sources=[ScriptedSource(log)])
    with pytest.raises(WriteRejected, match="no rule file allows writes"):
        await gateway.execute_command(Command("probe.value", 3, "platform"))
    assert log == []  # never reached the driver
    assert gateway.commands.entries[-1]["result"] == "refused"


async def test_rule_outputs_reach_the_outbox_and_the_driver(tmp_path: Path) -> None:
    """A rule that fires publishes (stored as a durable event) and writes (through the allowlist to the driver)."""
    rules = tmp_path / "probe-rules.yaml"
    rules.write_text(
        "version: 1\n"
        "allow:\n  modbus:\n    - {point: probe.value, min: 0, max: 10}\n"
        "rules:\n"
        "  - id: probe-high\n"
        "    when: probe.value > 0.5\n"
        "    then:\n"
        "      - publish: {topic: alerts/probe, payload: {value: '=probe.value'}}\n"
        "      - write: {point: probe.value, value: 5}\n"
    )
    site_path = tmp_path / "site.yaml"
    site_path.write_text(
        "version: 1\ngateway: {id: gw1, site: lab}\nhttp: {enabled: false}\nrules: [probe-rules.yaml]\n"
    )
    site = load_site(site_path)
    site.registry.add(PointInfo("probe.value", writable=True))
    log: list[str] = []
    gateway = Gateway(site, data_dir=tmp_path / "data", sources=[ScriptedSource(log)])
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    await asyncio.wait_for(gateway.started.wait(), 5)
    await _until(lambda: "write probe.value" in log)
    stop.set()
    await asyncio.wait_for(runner, 3)
    assert "write probe.value" in log
    assert gateway.commands.entries[-1]["result"] == "ok"
    outbox = Outbox(tmp_path / "data" / "outbox.db")
    try:
        published = [s.event for s in outbox.read_events(0) if s.event.type == "publish"]
    finally:
        await outbox.close()
    assert published
    assert published[0].subject == "alerts/probe"
    assert published[0].body == {"value": 1.0}


async def test_a_hostile_rule_file_on_reload_is_refused_and_the_running_rules_stay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An alias bomb dropped in over a running gateway's rule file: the reload (the watcher's, or SIGHUP's) is refused
    in bounded time with the error logged, and the rules that were running keep running."""
    rules = tmp_path / "probe-rules.yaml"
    good = "version: 1\nrules:\n  - id: probe-high\n    when: probe.value > 0.5\n    then:\n" + (
        "      - publish: {topic: alerts/probe, payload: {value: '=probe.value'}}\n"
    )
    rules.write_text(good)
    site_path = tmp_path / "site.yaml"
    site_path.write_text(
        "version: 1\ngateway: {id: gw1, site: lab}\nhttp: {enabled: false}\nrules: [probe-rules.yaml]\n"
    )
    site = load_site(site_path)
    site.registry.add(PointInfo("probe.value"))
    # the ticker (which runs the reload) waits its second on a fake clock: a few milliseconds of real time
    gateway = Gateway(site, data_dir=tmp_path / "data", sources=[ScriptedSource([])], clock=FakeClock())
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    await asyncio.wait_for(gateway.started.wait(), 5)
    running = gateway.rules
    rules.write_text(
        "version: 1\n" + "".join(f"l{i}: &a{i} [{', '.join([f'*a{i - 1}' if i else 'lol'] * 10)}]\n" for i in range(10))
    )
    with caplog.at_level(logging.ERROR, logger="gateway.supervisor"):
        gateway.request_reload()
        await _until(lambda: any("rule reload refused" in r.getMessage() for r in caplog.records))
    stop.set()
    await asyncio.wait_for(runner, 3)
    # the watcher may see the change too: each reload is refused the same way
    refused = [r.getMessage() for r in caplog.records if "rule reload refused" in r.getMessage()]
    assert refused
    assert all(f"{rules}:2:5: YAML anchors and aliases are not allowed" in message for message in refused)
    assert gateway.rules is running
    assert [s.id for s in gateway.rules.status()] == ["probe-high"]


class CountingSource(ScriptedSource):
    """Publishes 1, 2, 3, ... every 5 ms until stopped."""

    def __init__(self) -> None:
        super().__init__([])
        self.published: list[float] = []

    async def run(self, publish: BatchSink, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            value = float(len(self.published) + 1)
            self.published.append(value)
            await publish([Sample("probe.value", value, time.time_ns())])
            await asyncio.sleep(0.005)


async def test_a_full_disk_holds_data_back_instead_of_losing_it(tmp_path: Path) -> None:
    source = CountingSource()
    clock = FakeClock(auto_advance=True)  # the store's retry waits take no real time
    gateway = Gateway(_probe_site(tmp_path), data_dir=tmp_path / "data", sources=[source], clock=clock)
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    await asyncio.wait_for(gateway.started.wait(), 5)
    assert gateway.outbox is not None
    outbox = gateway.outbox
    await _until(lambda: outbox.stats.telemetry_samples >= 5)
    db = outbox._db  # the real SQLite file refuses to grow: what a full disk looks like to the writer
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    await _until(lambda: not outbox.writable())
    stored_during_outage = outbox.stats.telemetry_samples
    db.execute("PRAGMA max_page_count = 1073741823")  # space freed
    await _until(lambda: outbox.stats.telemetry_samples >= stored_during_outage + 5)
    stop.set()
    await asyncio.wait_for(runner, 5)
    values = [s.value for s in await _stored(tmp_path / "data" / "outbox.db")]
    assert values == source.published  # everything, in order, once
    assert len(values) > stored_during_outage
    assert gateway.store_lost == 0


class FloodingSource(CountingSource):
    """Publishes as fast as its sink lets it, so a refusing store blocks this source at once."""

    def __init__(self) -> None:
        super().__init__()
        self.sink_said: list[bool | None] = []

    async def run(self, publish: BatchSink, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            value = float(len(self.published) + 1)
            self.published.append(value)
            self.sink_said.append(await publish([Sample("probe.value", value, time.time_ns())]))
            await asyncio.sleep(0)


async def test_a_stop_while_the_disk_refuses_ends_in_seconds_and_counts_what_was_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The queue is full and the source is blocked on it when the stop comes: the store must give up after its grace,
    # or the source never returns, the bus never closes and the stop waits for systemd's SIGKILL.
    source = FloodingSource()
    clock = FakeClock(auto_advance=True)  # the store's retry waits and the grace take no real time
    gateway = Gateway(_probe_site(tmp_path), data_dir=tmp_path / "data", sources=[source], clock=clock)
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    await asyncio.wait_for(gateway.started.wait(), 5)
    assert gateway.outbox is not None
    outbox = gateway.outbox
    db = outbox._db
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")  # the disk is full
    await _until(lambda: not outbox.writable() and bool(gateway._awaiting_store))
    assert gateway._awaiting_store  # the source is now blocked on its sink, waiting for a commit
    stop.set()
    await asyncio.wait_for(runner, 5)
    # given up once the grace was over, and soon after: a retry wait under way at the stop (at most 5 s) runs out,
    # then the store retries every 0.25 s at most
    assert gateway._stop_requested_at is not None
    assert STOP_STORE_GRACE_SECONDS <= clock.monotonic() - gateway._stop_requested_at <= STOP_STORE_GRACE_SECONDS + 5
    stored = await _stored(tmp_path / "data" / "outbox.db")
    assert gateway.store_lost > 0
    assert len(stored) + gateway.store_lost == len(source.published)  # every sample is stored or counted as lost
    # the sink told the source which batches are not on disk (an MQTT source leaves those unacknowledged)
    assert source.sink_said.count(False) == gateway.store_lost
    assert [s.value for s in stored] == [v for v, ok in zip(source.published, source.sink_said, strict=False) if ok]
    assert caplog.text.count("stopped with the store failing") == 1


class CommitCheckingSource(CountingSource):
    """After each publish, looks into the outbox: is the batch already there when the sink returns?"""

    def __init__(self) -> None:
        super().__init__()
        self.gateway: Gateway | None = None
        self.seen_on_return: list[tuple[bool | None, bool]] = []

    async def run(self, publish: BatchSink, stopping: asyncio.Event) -> None:
        assert self.gateway is not None and self.gateway.outbox is not None
        while not stopping.is_set() and len(self.published) < 50:
            value = float(len(self.published) + 1)
            self.published.append(value)
            said = await publish([Sample("probe.value", value, time.time_ns())])
            stored = self.gateway.outbox.read_telemetry(0, limit=1_000_000)
            self.seen_on_return.append((said, value in {s.value for b in stored for s in b.samples}))
        await stopping.wait()


async def test_the_sink_returns_only_once_the_outbox_has_committed_the_batch(tmp_path: Path) -> None:
    # An MQTT source acknowledges QoS 1 messages when its sink returns: returning at the bus, before the commit,
    # let a crash in between lose an acknowledged message.
    source = CommitCheckingSource()
    gateway = Gateway(_probe_site(tmp_path), data_dir=tmp_path / "data", sources=[source])
    source.gateway = gateway
    stop = asyncio.Event()
    runner = asyncio.ensure_future(gateway.run(stop))
    await asyncio.wait_for(gateway.started.wait(), 5)
    await _until(lambda: len(source.seen_on_return) == 50)
    stop.set()
    await asyncio.wait_for(runner, 5)
    assert source.seen_on_return == [(True, True)] * 50


async def test_a_refusal_inside_the_task_group_reaches_the_caller_as_itself(tmp_path: Path) -> None:
    # the status page on a public address without a token is refused inside the TaskGroup; on Python < 3.11.4 a
    # re-raise from `except*` came out wrapped in an ExceptionGroup, and the CLI printed a traceback
    gateway = Gateway(_demo(), data_dir=tmp_path, http_listen="0.0.0.0:0")
    with pytest.raises(ConfigError, match="not loopback") as caught:
        await asyncio.wait_for(gateway.run(asyncio.Event()), 10)
    assert type(caught.value) is ConfigError


async def test_a_data_directory_that_cannot_be_created_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    gateway = Gateway(_probe_site(tmp_path), data_dir=blocker / "data", sources=[])
    with pytest.raises(StoreError, match="cannot create data directory"):
        await gateway.run(asyncio.Event())


def test_an_expected_stage_fault_is_logged_once_and_a_bug_every_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.supervisor")
    clock = FakeClock()
    gateway = Gateway(_probe_site(tmp_path), data_dir=tmp_path / "data", sources=[], clock=clock)
    for _ in range(3):  # a failing disk under the incentive ledger, batch after batch
        gateway._stage_failed("incentive stage", StoreError("disk I/O error"), "a batch")
        gateway._stage_ok("incentive stage")  # a batch that never touched the disk proves nothing
    assert caplog.text.count("incentive stage failed: disk I/O error") == 1
    assert "works again" not in caplog.text
    clock.advance(STAGE_RECOVERY_SECONDS - 0.1)
    gateway._stage_ok("incentive stage")
    assert "works again" not in caplog.text
    clock.advance(0.1)
    gateway._stage_ok("incentive stage")
    assert "incentive stage works again" in caplog.text
    assert "Traceback" not in caplog.text

    for _ in range(2):
        gateway._stage_failed("rules engine", RuntimeError("a bug"), "a batch of 3 samples")
    bugs = [r for r in caplog.records if r.getMessage() == "rules engine failed on a batch of 3 samples"]
    assert len(bugs) == 2 and all(r.exc_info for r in bugs)
