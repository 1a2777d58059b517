"""The supervisor: builds the gateway from a validated site, runs it in one TaskGroup, and stops it in order.

Owns start-up order, shutdown order, the command router (allowlist, then the owning driver) and the glue between the
bus and its consumers. It imports driver packages, the rules engine, the incentive stage, the uplinks and the HTTP
server lazily, only when the site uses them, so a small site does not pay for libraries it does not need.

Start-up takes the data directory's lock (one process per data directory), then builds from the outbox outward:
    outbox -> rules -> incentives -> bus consumers -> uplinks -> HTTP -> drivers.
Shutdown goes the other way, so nothing read is lost:
    1. drivers stop (each publishes what it has already read),
    2. the bus closes; the store, rules and incentive consumers drain every queued batch,
    3. rule and incentive outputs produced while draining are stored,
    4. uplinks get a bounded final flush of what is committed,
    5. the HTTP server stops, then the outbox is closed (its writer thread commits everything queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import orjson

from gateway.aggregate import BuildingAggregate, build_aggregate
from gateway.bus import Bus, Subscription
from gateway.config.site import Site
from gateway.driver_api import DeviceStatus, Source
from gateway.errors import (
    ConfigError,
    DeviceError,
    GatewayError,
    StoreError,
    WriteRejected,
    task_group_error,
)
from gateway.files import DataDirLock
from gateway.live import LiveCache
from gateway.model import Command, Event, Sample
from gateway.outbox import Outbox
from gateway.reconnect import Clock, ReconnectPolicy, RetryTiming
from gateway.rule_report import ReloadResult, RuleProblemLog
from gateway.status import CommandEntry, GatewayStatus

if TYPE_CHECKING:
    from gateway.incentives.stage import IncentiveStage
    from gateway.registry import PointRegistry
    from gateway.status import UplinkRunnerPart
    from rules.runtime import Outputs, RuleRuntime

log = logging.getLogger(__name__)

#: how long uplinks may keep flushing after the drivers stopped (systemd's TimeoutStopSec is longer)
FINAL_FLUSH_SECONDS = 1.0
#: after a stop is requested, how long appends to a store that refuses them (failing disk) are retried; then what
#: it still refuses is given up, counted and reported, so a stop ends in seconds rather than when systemd kills it
STOP_STORE_GRACE_SECONDS = 2.0
#: the most samples the store loop groups into one outbox row: the platform uplink's default request size, so a
#: grouped row never makes a request larger than an uplink's own batching would (a single larger poll is stored as is)
STORE_GROUP_SAMPLES = 2000
#: how long the store loop waits, after a batch arrives at an idle outbox, for the rest of a poll cycle to join it in
#: one transaction: a Modbus bus commits its devices' polls together, not one transaction each (issue 19)
STORE_LINGER_SECONDS = 0.02
#: a stage in an expected fault (its store refusing) counts as working again after this long without a failure: one
#: successful step proves little, since many steps (a batch with no meter reading) never touch the disk
STAGE_RECOVERY_SECONDS = 10.0
TICK_SECONDS = 1.0
#: a crashed source is restarted 1 s after a first crash, doubling to a minute while it keeps crashing; a source that
#: ran longer than the maximum before crashing counts as having worked (the delay starts over)
SOURCE_RESTART_TIMING = RetryTiming(first=1.0, maximum=60.0)


#: what the outbox stores: samples, or events
_Record = TypeVar("_Record", Sample, Event)


@dataclass(slots=True)
class CommandLog:
    """The last commands and what became of them (status page, tests)."""

    entries: list[CommandEntry] = field(default_factory=list)
    limit: int = 200

    def add(self, command: Command, result: str, detail: str | None = None) -> None:
        self.entries.append(
            {
                "ts": time.time_ns(),
                "point": command.point,
                "value": command.value,
                "origin": command.origin,
                "result": result,
                "detail": detail,
            }
        )
        del self.entries[: -self.limit]


def build_sources(site: Site) -> list[Source]:
    """One source per bus / broker / simulator, from the plugins of the drivers this site uses (each imports its
    protocol library only then), in the registry's order."""
    from gateway.plugins import drivers_named

    used = {device.driver for device in site.config.devices}
    return [source for plugin in drivers_named(used).values() for source in plugin.build_sources(site)]


def load_rules(site: Site, registry: PointRegistry, state_path: Path | None) -> RuleRuntime | None:
    """The site's rule runtime, or None when it has no rule files. Raises ConfigError."""
    if not site.rule_files:
        return None
    from rules.runtime import RuleRuntime, RuleStateStore

    state = RuleStateStore(state_path) if state_path is not None else None
    return RuleRuntime.load(site.rule_files, registry, timezone=site.config.gateway.timezone, state=state)


class Gateway:
    """One running gateway. ``await Gateway(site, data_dir=...).run(stop)`` returns when ``stop`` is set and the
    shutdown sequence has finished."""

    def __init__(
        self,
        site: Site,
        *,
        data_dir: Path,
        http_listen: str | None = None,
        sources: Sequence[Source] | None = None,
        clock: Clock | None = None,
        restart_timing: RetryTiming = SOURCE_RESTART_TIMING,
    ) -> None:
        self.site = site
        #: monotonic time and waiting for the restart backoff, the ticker and the stop grace; tests pass a fake one
        #: (gateway.reconnect.Clock, as the uplink runners use) so none of them waits in real time
        self.clock = clock or Clock()
        self.restart_timing = restart_timing
        self.data_dir = Path(data_dir)
        self.http_listen = http_listen if http_listen is not None else site.config.http.listen
        self.registry = site.registry
        self.live = LiveCache()
        self.bus = Bus()
        self.sources: list[Source] = list(sources) if sources is not None else []
        self._sources_given = sources is not None
        self.outbox: Outbox | None = None
        self.rules: RuleRuntime | None = None
        self.incentives: IncentiveStage | None = None
        #: the sum of the household meters for the platform (privacy.building_aggregate), or None
        self.aggregate: BuildingAggregate | None = None
        self.uplinks: list[UplinkRunnerPart] = []
        self.commands = CommandLog()
        self.started = asyncio.Event()
        self.started_ns = 0
        self.rule_problems = RuleProblemLog()
        #: the outcome of the last rule reload (None before the first): a refusal stays until a reload succeeds
        self.rule_reload: ReloadResult | None = None
        #: records given up because the store kept failing during shutdown (normally 0)
        self.store_lost = 0
        #: records dropped because they cannot be encoded (e.g. an integer beyond 64 bits computed by a rule)
        self.unencodable = 0
        self._stop_requested_at: float | None = None
        self._last_store_error = ""
        #: per stage ("incentive stage", "rules tick", ...), the expected fault it is in and when it last failed,
        #: so an outage is logged once when it starts and once when it is over
        self._stage_faults: dict[str, tuple[str, float]] = {}
        self._rules_sub: Subscription | None = None
        #: batches published by sources, waiting for the outbox to commit them: id(batch) -> stored?
        self._awaiting_store: dict[int, asyncio.Future[bool]] = {}
        self._command_queue: asyncio.Queue[Command | None] = asyncio.Queue(maxsize=1000)
        self._reload_requested = asyncio.Event()
        #: never set: a store retry waits on time alone
        self._no_wake = asyncio.Event()
        #: callbacks run once the gateway is up (systemd READY=1, tests)
        self.on_ready: list[Callable[[], None]] = []
        #: extra long-running tasks (the systemd watchdog): started with the others, cancelled at the end
        self.extra_tasks: list[tuple[str, Callable[[asyncio.Event], Coroutine[object, None, None]]]] = []

    # -- status for the HTTP server and the CLI ---------------------------------------------------------------

    def knows_point(self, point: str) -> bool:
        return point in self.registry or point in self.live.latest

    def device_status(self) -> list[DeviceStatus]:
        return [status for source in self.sources for status in source.status()]

    def status_snapshot(
        self, *, watch: bool = False, records: bool = False, history: bool = False, point: str | None = None
    ) -> GatewayStatus:
        """One immutable picture of every part, for the status page, the API and /metrics (gateway/status.py).

        ``watch``: someone looks at the points (the live cache keeps the sparklines' history, gateway/live.py);
        ``records``: read today's incentive records from the ledger; ``history``: include the sparklines' history
        (every point's, or ``point``'s only)."""
        from gateway import snapshot as part

        if watch or history:
            self.live.watched()
        identity = self.site.config.gateway
        now_ns = time.time_ns()
        return GatewayStatus(
            now_ns=now_ns,
            gateway_id=identity.id,
            site=identity.site,
            name=identity.name,
            timezone=identity.timezone,
            started=self.started.is_set(),
            started_ns=self.started_ns,
            has_sources=bool(self.sources),
            devices=tuple(part.copy_device(status) for status in self.device_status()),
            device_counters=part.device_counters(self.sources),
            source_counters=part.source_counters(self.sources),
            points=tuple(self.registry.values()),
            latest=dict(self.live.latest),
            awaiting=part.awaiting(self.aggregate),
            history=part.history(self.live, point) if history else {},
            rules=part.rules_status(self.rules, self.rule_problems, self.rule_reload),
            uplinks=tuple(part.uplink_status(runner) for runner in self.uplinks),
            queues=tuple(part.queue_status(sub) for sub in self.bus.subscriptions()),
            published_samples=self.bus.published_samples,
            outbox=part.outbox_status(self.outbox),
            incentives=part.incentives_status(self.incentives, identity.timezone, records=records),
            commands=tuple(self.commands.entries),
        )

    def source_for(self, point: str) -> Source | None:
        device = point.partition(".")[0]
        for source in self.sources:
            if device in source.devices:
                return source
        return None

    # -- commands -------------------------------------------------------------------------------------------

    async def execute_command(self, command: Command) -> None:
        """Check ``command`` against the allowlist and write it through the owning driver.

        Raises WriteRejected (refused, never sent) or DeviceError (sent and failed). Used for rule actions and for
        commands from the city platform alike: there is one allowlist, and no way around it.
        """
        try:
            if self.rules is None:
                raise WriteRejected(f"{command.point}: no rule file allows writes on this gateway")
            command = self.rules.allowlist.check(command)  # stamped with the entry's priority
            info = self.registry.get(command.point)
            if info is None or not info.physical:
                raise WriteRejected(f"{command.point}: unknown device point")
            source = self.source_for(command.point)
            if source is None:
                raise WriteRejected(f"{command.point}: no driver owns device {info.device!r}")
            await source.write(command)
        except WriteRejected as exc:
            log.warning("write refused: %s = %r from %s: %s", command.point, command.value, command.origin, exc)
            self.commands.add(command, "refused", str(exc))
            raise
        except DeviceError as exc:
            log.warning("write failed: %s = %r from %s: %s", command.point, command.value, command.origin, exc)
            self.commands.add(command, "failed", str(exc))
            raise
        log.info("write: %s = %r from %s", command.point, command.value, command.origin)
        self.commands.add(command, "ok")

    async def _command_loop(self) -> None:
        """Rule writes run here, one at a time, so a slow device never stalls rule evaluation."""
        while (command := await self._command_queue.get()) is not None:
            with contextlib.suppress(GatewayError):
                await self.execute_command(command)

    # -- bus consumers ----------------------------------------------------------------------------------------

    async def _store_loop(self, sub: Subscription, outbox: Outbox) -> None:
        """Commit what the sources publish. Group commit: a batch that finds the queue empty waits
        STORE_LINGER_SECONDS for the rest of its poll cycle, and what queued meanwhile (or while the last transaction
        ran) is stored with it, as one outbox row in one transaction (up to STORE_GROUP_SAMPLES). The writer's cost
        then follows the rate of transactions, not of polls. No wait when more is queued already (the store is
        behind: grouping happens by itself) nor once a stop was requested."""
        async for batch in sub:
            if not sub.depth() and len(batch) < STORE_GROUP_SAMPLES and self._stop_requested_at is None:
                await self.clock.wait(self._no_wake, STORE_LINGER_SECONDS)
            group = [batch, *sub.take_queued(STORE_GROUP_SAMPLES - len(batch))]
            for each, stored in zip(group, await self._store_group(outbox.append, group), strict=True):
                waiter = self._awaiting_store.pop(id(each), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(stored)

    async def _store_group(
        self, append: Callable[[Sequence[Sample]], Awaitable[object]], group: list[list[Sample]]
    ) -> list[bool]:
        """Store ``group`` as one row; what ``_store`` says of each batch. A batch that cannot be encoded (an integer
        beyond 64 bits from a rule) must cost only itself, as it did before batches were grouped: the group is then
        stored batch by batch."""
        if len(group) == 1:
            return [await self._store(append, group[0])]
        try:
            return [
                await self._store(append, [sample for each in group for sample in each], unencodable="raise")
            ] * len(group)
        except (TypeError, ValueError):
            return [await self._store(append, each) for each in group]

    async def _publish_stored(self, batch: list[Sample]) -> bool:
        """The sink every source gets: publish on the bus, then wait until the outbox has committed the batch.

        True once it is on disk; False when it was given up while stopping (the disk refusing past the grace, counted
        in ``store_lost``). Returning at the bus, before the commit, let the MQTT driver acknowledge a QoS 1 message
        that a crash could still lose. The outbox subscription gets the very list published, so the list's id keys
        its waiter (the list stays alive, held by this frame, until the waiter is done).
        """
        if not batch:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._awaiting_store[id(batch)] = waiter
        try:
            await self.bus.publish(batch)
            return await waiter
        finally:
            self._awaiting_store.pop(id(batch), None)

    async def _store(
        self,
        append: Callable[[Sequence[_Record]], Awaitable[object]],
        items: Sequence[_Record],
        *,
        unencodable: Literal["drop", "raise"] = "drop",
    ) -> bool:
        """Append to the outbox, retrying while the disk refuses (full, read-only, I/O error).

        While this retries, the bus queue fills and the drivers wait: back-pressure rather than silent loss. The
        outbox logs each distinct failure once. Only when a stop was requested more than STOP_STORE_GRACE_SECONDS
        ago and the disk still refuses is the data given up: then every append is tried once, and what is refused
        is counted (``store_lost``) and reported in one line when the gateway has stopped. The grace is counted
        from the stop request, not from the bus closing: a driver blocked on a full queue (the store refusing for
        minutes) or the ticker inside this loop must be let go, or the stop would never reach the bus.
        """
        delay = 0.05
        while True:
            try:
                await append(items)
                return True
            except (TypeError, ValueError) as exc:
                if unencodable == "raise":
                    raise  # the caller stores the parts one by one
                # not encodable (e.g. an integer beyond 64 bits computed by a rule): retrying cannot help, and
                # letting it escape would stop the gateway; drop this batch, counted and logged. True: a redelivery
                # of the same message would be refused the same way.
                self.unencodable += len(items)
                log.error("%d records cannot be stored and were dropped: %s", len(items), exc)
                return True
            except StoreError as exc:
                stop_at = self._stop_requested_at
                if stop_at is not None and self.clock.monotonic() - stop_at >= STOP_STORE_GRACE_SECONDS:
                    self.store_lost += len(items)
                    self._last_store_error = str(exc)
                    return False
            # while stopping, retry often enough to give up soon after the grace ends
            await self.clock.wait(self._no_wake, delay if self._stop_requested_at is None else min(delay, 0.25))
            delay = min(delay * 2, 5.0)

    async def _emit_derived(self, samples: list[Sample]) -> None:
        if not samples:
            return
        if not self.bus.closed:
            await self.bus.publish(samples, skip=self._rules_sub)
            return
        # draining after the bus closed: store directly so nothing derived from the last reads is lost
        self.live.update(samples)
        assert self.outbox is not None
        await self._store(self.outbox.append, samples)

    async def _handle_rule_outputs(self, outputs: Outputs) -> None:
        assert self.outbox is not None
        await self._emit_derived(list(outputs.samples))
        events: list[Event] = list(outputs.events)
        for topic, payload in outputs.publishes:
            # A rule's publish travels through the outbox like any event (durable, acked, replayed): the MQTT
            # uplink sends it to {prefix}/{site}/{gateway}/{topic} with this body as the payload.
            decoded = orjson.loads(payload) if isinstance(payload, bytes | bytearray | str) else payload
            body = decoded if isinstance(decoded, dict) else {"value": decoded}
            now = time.time_ns()
            events.append(Event(f"publish:{topic}:{now}", "publish", topic, now, body))
        if events:
            await self._store(self.outbox.append_events, events)
        for command in outputs.commands:
            try:
                self._command_queue.put_nowait(command)
            except asyncio.QueueFull:
                log.error("command queue full: dropping %s = %r from %s", command.point, command.value, command.origin)
                self.commands.add(command, "dropped", "command queue full")
        # The engine reports a problem once, when it starts (not on every batch), and a condition once more when it
        # is over: a short, time-stamped log, newest last. The current state of each rule is in rules.status().
        for problem in outputs.problems:
            self.rule_problems.add(problem)
        for over in outputs.resolved:
            self.rule_problems.resolve(over.subject, over.ts, over.message)

    def _stage_failed(self, stage: str, exc: Exception, what: str) -> None:
        """A stage's step failed and will be tried again with the next batch or tick.

        A GatewayError is an expected fault (a full or failing disk under the rule state or the incentive ledger):
        one line when it starts or changes, none while it repeats, one when the stage works again (``_stage_ok``).
        Anything else is a bug, logged with its traceback every time.
        """
        if isinstance(exc, GatewayError):
            message = str(exc)
            previous = self._stage_faults.get(stage)
            self._stage_faults[stage] = (message, self.clock.monotonic())
            if previous is None or previous[0] != message:
                log.error("%s failed: %s (retrying; logged once)", stage, message)
            return
        log.error("%s failed on %s", stage, what, exc_info=exc)

    def _stage_ok(self, stage: str) -> None:
        fault = self._stage_faults.get(stage)
        if fault is not None and self.clock.monotonic() - fault[1] >= STAGE_RECOVERY_SECONDS:
            del self._stage_faults[stage]
            log.info("%s works again (no failure for %.0f s)", stage, STAGE_RECOVERY_SECONDS)

    async def _rules_loop(self, sub: Subscription) -> None:
        async for batch in sub:
            rules = self.rules  # read per batch: a reload replaces the runtime
            if rules is None:
                continue
            try:
                outputs = rules.process(batch, time.time_ns())
            except Exception as exc:
                # The engine isolates each rule's errors itself; this is the net for a bug in the engine or a failing
                # disk under its state: the batch is already stored, and the next one is evaluated.
                self._stage_failed("rules engine", exc, f"a batch of {len(batch)} samples")
                continue
            self._stage_ok("rules engine")
            await self._handle_rule_outputs(outputs)
            self._flush_rule_state()

    def _flush_rule_state(self) -> None:
        """The engine's steps do no I/O: what changed in them (timers, latches, values rules set) is written here,
        after their outputs are handled. A failing disk is logged once; the changes are kept for the next flush."""
        rules = self.rules
        if rules is None:
            return
        try:
            rules.flush_state()
        except Exception as exc:
            self._stage_failed("rule state", exc, "saving rule state")
        else:
            self._stage_ok("rule state")

    async def _incentives_loop(self, sub: Subscription, stage: IncentiveStage, outbox: Outbox) -> None:
        async for batch in sub:
            try:
                events = stage.process(batch, time.time_ns())
            except Exception as exc:
                # readings stay in the outbox and the stage's own history: the interval is recomputed later
                self._stage_failed("incentive stage", exc, f"a batch of {len(batch)} samples")
                continue
            self._stage_ok("incentive stage")
            if events:
                await self._store(outbox.append_events, events)

    async def _tick_loop(self, stopping: asyncio.Event) -> None:
        """Time-driven work: rule timers and schedules, incentive intervals closing with no new reading."""
        assert self.outbox is not None
        watcher = None
        if self.rules is not None:
            from rules.reload import RuleFileWatcher

            watcher = RuleFileWatcher(self.site.rule_files)
        ticks = 0
        while not stopping.is_set():
            await self.clock.wait(stopping, TICK_SECONDS)
            ticks += 1
            # an edited rule file reloads like SIGHUP does (checked every 2 s: a stat per file, no inotify needed)
            if watcher is not None and ticks % 2 == 0 and watcher.changed():
                log.info("rule file changed on disk: reloading")
                self.request_reload()
            now = time.time_ns()
            # like the process() paths: a failing tick (a full disk under the rule state or the ledger, a bug) is
            # logged and tried again next second; it never takes the drivers and the store down with it
            if self.rules is not None:
                try:
                    outputs = self.rules.tick(now)
                except Exception as exc:
                    self._stage_failed("rules tick", exc, "a tick")
                else:
                    self._stage_ok("rules tick")
                    await self._handle_rule_outputs(outputs)
                    self._flush_rule_state()
            if self.incentives is not None:
                try:
                    events = self.incentives.tick(now)
                except Exception as exc:
                    self._stage_failed("incentive tick", exc, "a tick")
                    events = []
                else:
                    self._stage_ok("incentive tick")
                if events:
                    await self._store(self.outbox.append_events, events)
            if self.aggregate is not None:
                # an ordinary building point from here on: stored, shown and sent like any reading
                await self.bus.publish(self.aggregate.tick(now))
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                await self._reload_rules()

    # -- reload -----------------------------------------------------------------------------------------------

    def request_reload(self) -> None:
        """SIGHUP or a rule file change: reload at the next tick, between batches."""
        self._reload_requested.set()

    async def _reload_rules(self) -> None:
        if self.rules is None or not self.site.rule_files:
            return
        from rules.runtime import reload as reload_rules

        files = self.site.rule_files
        try:
            self.rules = reload_rules(self.rules, files, self.registry)
        except ConfigError as exc:
            log.error("rule reload refused, the previous rules keep running:\n%s", exc)
            self.rule_reload = ReloadResult.refused(files, time.time_ns(), exc.diagnostics)
            return
        except Exception as exc:
            log.exception("rule reload failed, the previous rules keep running")
            reason = f"{type(exc).__name__}: {exc}"
            self.rule_reload = ReloadResult.refused(files, time.time_ns(), (), reason=reason)
            return
        for info in self.rules.derived_points():
            if info.id not in self.registry:
                self.registry.add(info)
        now = time.time_ns()
        self.rule_reload = ReloadResult.ok(files, now)
        # failed rules run again and the new runtime reports afresh whatever is still missing
        self.rule_problems.resolve_all(now, "rules reloaded")
        log.info("rules reloaded from %d file(s)", len(files))
        await self._emit_derived(self.rules.initial_samples(time.time_ns()))  # virtual points the reload added

    # -- drivers ----------------------------------------------------------------------------------------------

    async def _run_source(self, source: Source, stopping: asyncio.Event) -> None:
        """Run a source; if it crashes (a bug, not a device fault: those it handles), log and restart it."""
        clock = self.clock
        policy = ReconnectPolicy(f"{source.name} restarts", self.restart_timing, clock=clock.monotonic, logger=log)
        while not stopping.is_set():
            started = clock.monotonic()
            try:
                await source.run(self._publish_stored, stopping)
                return
            except Exception:
                if clock.monotonic() - started > policy.timing.maximum:
                    policy.succeeded()
                wait = policy.failed("crashed")
                log.exception("%s crashed; restarting in %.1f s", source.name, wait)
            await clock.wait(stopping, wait)

    # -- the whole lifecycle ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set and the shutdown sequence has finished.

        Raises ConfigError (the site, its rules or the status page's address are refused at start), StoreError
        (the data directory or the outbox cannot be opened) or another GatewayError, always as itself: a failure
        inside the TaskGroup is unwrapped by ``task_group_error``, so the caller never sees an ExceptionGroup for
        a refusal, on any Python 3.11.
        """
        # One gateway process per data directory: the lock is taken before the outbox, the rule state or the ledger
        # is opened, and held until they are closed. A second process gets DataDirBusy (exit 3), not a second writer.
        try:
            lock = DataDirLock(self.data_dir).acquire()  # creates the directory (0700) when it is missing
        except OSError as exc:
            raise StoreError(f"cannot create data directory {self.data_dir}: {exc.strerror or exc}") from None
        try:
            await self._run_locked(stop)
        finally:
            lock.release()

    async def _run_locked(self, stop: asyncio.Event) -> None:
        storage = self.site.config.storage
        outbox = self.outbox = Outbox(
            self.data_dir / "outbox.db",
            durability=storage.durability,
            telemetry_budget=storage.telemetry_budget,
            event_budget=storage.event_budget,
        )
        try:
            await self._run_with_outbox(stop, outbox)
        except BaseExceptionGroup as group:
            # a refusal inside the TaskGroup (e.g. the status page on a public address without a token) reaches the
            # caller as itself, so `run` prints it as one config/runtime error line rather than a traceback
            error = task_group_error(group)
            if error is None:
                raise
            raise error from None
        finally:
            if self.incentives is not None:
                self.incentives.close()
            if self.rules is not None:
                self.rules.close()
            await outbox.close()
            if self.store_lost:
                log.error(
                    "stopped with the store failing: %d records not stored (%s)",
                    self.store_lost,
                    self._last_store_error,
                )
            log.info("gateway stopped; outbox closed")

    async def _run_with_outbox(self, stop: asyncio.Event, outbox: Outbox) -> None:
        site = self.site
        self.rules = load_rules(site, self.registry, self.data_dir / "rules-state.db")
        if self.rules is not None:
            for info in self.rules.derived_points():
                if info.id not in self.registry:
                    self.registry.add(info)
        if site.config.incentives is not None:
            from gateway.incentives.stage import IncentiveStage

            self.incentives = IncentiveStage.open(site, self.data_dir)
        self.aggregate = build_aggregate(site)

        self.bus.tap(self.live.update)
        if self.aggregate is not None:
            self.bus.tap(self.aggregate.update)
        store_sub = self.bus.subscribe("outbox", maxsize=1024)
        self._rules_sub = self.bus.subscribe("rules", maxsize=256) if self.rules is not None else None
        incentives_sub = self.bus.subscribe("incentives", maxsize=256) if self.incentives is not None else None
        if self.rules is not None:
            # virtual points start at their `initial:` value: stored and shown like a reading from the first second
            await self._emit_derived(self.rules.initial_samples(time.time_ns()))
        if not self._sources_given:
            self.sources = build_sources(site)
        self.uplinks = self._build_uplinks(outbox)

        sources_stopping = asyncio.Event()
        uplinks_stopping = asyncio.Event()
        http_stopping = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            consumers = [tg.create_task(self._store_loop(store_sub, outbox), name="bus.outbox")]
            if self._rules_sub is not None:
                consumers.append(tg.create_task(self._rules_loop(self._rules_sub), name="bus.rules"))
            if incentives_sub is not None and self.incentives is not None:
                incentives_loop = self._incentives_loop(incentives_sub, self.incentives, outbox)
                consumers.append(tg.create_task(incentives_loop, name="bus.incentives"))
            command_task = tg.create_task(self._command_loop(), name="commands")
            ticker = tg.create_task(self._tick_loop(sources_stopping), name="ticker")
            uplink_tasks = [tg.create_task(u.run(uplinks_stopping), name=u.name) for u in self.uplinks]
            http_task = self._start_http(tg, http_stopping)
            if http_task is None:
                # nothing can read the sparklines' history: do not keep it (gateway/live.py, issue 19)
                self.live.stop_history()
            extra = [tg.create_task(fn(http_stopping), name=name) for name, fn in self.extra_tasks]
            source_tasks = [
                tg.create_task(self._run_source(s, sources_stopping), name=f"driver.{s.name}") for s in self.sources
            ]
            self.started_ns = time.time_ns()
            self.started.set()
            log.info(
                "gateway %s/%s up: %d devices, %d points, %d uplinks, data in %s",
                site.config.gateway.site,
                site.config.gateway.id,
                len(site.config.devices),
                len(self.registry),
                len(self.uplinks),
                self.data_dir,
            )
            for callback in self.on_ready:
                callback()

            await stop.wait()
            self._stop_requested_at = self.clock.monotonic()
            log.info("stopping: drivers first, then draining the bus")
            sources_stopping.set()
            await asyncio.gather(*source_tasks, ticker)
            self.bus.close()
            await asyncio.gather(*consumers)
            await self._command_queue.put(None)
            await command_task
            await outbox.sync()
            uplinks_stopping.set()
            if uplink_tasks:
                _done, pending = await asyncio.wait(uplink_tasks, timeout=FINAL_FLUSH_SECONDS + 1.0)
                for task in pending:
                    task.cancel()
            http_stopping.set()
            if http_task is not None:
                await http_task
            for task in extra:
                task.cancel()

    def _build_uplinks(self, outbox: Outbox) -> list[UplinkRunnerPart]:
        if not self.site.config.uplinks.configured_names():
            return []  # the runner module is not even imported
        from gateway.uplinks.runner import build_uplinks

        return build_uplinks(self.site, outbox, commands=self.execute_command, data_dir=self.data_dir)

    def _start_http(self, tg: asyncio.TaskGroup, stopping: asyncio.Event) -> asyncio.Task[None] | None:
        if not self.site.config.http.enabled or not self.http_listen or self.http_listen == "off":
            return None
        try:
            from gateway.http.server import serve
        except ModuleNotFoundError as exc:
            if exc.name != "gateway.http.server":
                raise
            log.warning("status page not available in this build")
            return None
        return tg.create_task(serve(self, self.http_listen, stopping), name="http")
