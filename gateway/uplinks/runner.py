"""The uplink runner: the one place batching, retry with backoff and jitter, in-flight bounds, replay pacing and
acking live, for every uplink (Telegraf's ``running_output``; the uplinks themselves only ``send``).

Owns ``UplinkRunner`` and ``build_uplinks``. Imports no protocol library itself: the InfluxDB and MQTT modules are
imported lazily by ``build_uplinks``, only when the site configures them.

Delivery model
    The outbox is the retry buffer: the runner holds nothing but positions. It reads stored batches after its
    cursor, sends them (``max_inflight`` requests at once), and moves the cursor only over requests the far side
    accepted, contiguously, so a crash re-sends at most what was in flight (same outbox ``seq``, same event ids).

    A retryable failure stops new requests, lets those in flight finish, rewinds the read positions to the
    cursors and waits ``retry_min * 2**n`` (capped at ``retry_max``, +-20 % jitter: gateway/reconnect.py) before
    trying again. A non-retryable failure (the far side will never accept this request, e.g. HTTP 400) splits the
    request in halves until the refused record is alone; that record is quarantined (logged, counted) and the rest
    arrives.

    Live first: when the link works and the next record to send is older than ``live_window`` (the link was down,
    or the gateway was), everything stored up to now becomes *backlog* (persisted as a gap in the cursor, see
    ``gateway.outbox.UplinkCursor``); live data is sent from the head on, and the backlog is replayed oldest first
    on at most ``replay_share`` of the in-flight slots, flagged ``historical``. Until a request has been accepted
    (at start, after a failure), a single request probes the link, so old data leaves strictly in order and the
    backlog never opens mid-outage. Events (alarms, incentives) are sent in order, one request at a time, ahead of
    telemetry.

    Shutdown: when ``stopping`` is set, live data and events committed so far get a bounded final flush
    (``final_flush`` seconds); whatever is not acked by then is sent again after the restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import StoreError, UplinkError
from gateway.model import Command
from gateway.outbox import Outbox, UplinkCursor
from gateway.reconnect import Clock, ReconnectPolicy, RetryTiming
from gateway.status import BrokerReporting, UplinkState, UplinkStatus
from gateway.uplinks.base import ConnectionAware, Uplink, UplinkBatch
from gateway.uplinks.config import DeliveryConfig

if TYPE_CHECKING:
    from gateway.config.site import Site
    from gateway.status import UplinkRunnerPart

log = logging.getLogger(__name__)

#: the supervisor's command path: checks the allowlist, writes through the owning driver; raises WriteRejected
#: (refused, never sent) or DeviceError (failed at the device)
CommandHandler = Callable[[Command], Awaitable[None]]

#: seconds between compactions of what every uplink has acked
COMPACT_EVERY = 5.0
#: how long an idle runner sleeps when no append woke it (appends normally wake it at once)
IDLE_WAIT = 1.0


@dataclass(slots=True)
class _Flight:
    """One request in flight: outbox seqs ``first..last`` of one stream."""

    first: int
    last: int
    done: bool = False


@dataclass(slots=True)
class RunnerCounters:
    sent_samples: int = 0
    sent_events: int = 0
    replayed_samples: int = 0
    quarantined: int = 0
    requests_ok: int = 0
    requests_failed: int = 0
    retries: int = 0


class UplinkRunner:
    """Drives one ``Uplink`` from the outbox until ``stopping`` is set."""

    def __init__(
        self,
        name: str,
        uplink: Uplink,
        outbox: Outbox,
        delivery: DeliveryConfig,
        *,
        cursor_name: str,
        clock: Clock | None = None,
        final_flush: float = 0.8,
        rng: random.Random | None = None,
    ) -> None:
        if not uplink.kinds:
            raise ValueError(f"{name}: the uplink delivers no stream")
        self.name = name
        self.uplink = uplink
        self.outbox = outbox
        self.delivery = delivery
        self.cursor_name = cursor_name
        self.clock = clock or Clock()
        self.final_flush = final_flush
        self.counters = RunnerCounters()
        self.state: UplinkState = "starting"
        self.last_error: str | None = None
        self._rng = rng or random.Random()
        self._replay_slots = max(1, int(delivery.replay_share * delivery.max_inflight))
        self._wake = asyncio.Event()
        #: set by an append (not by a finished request): new data, worth lingering for the rest of its poll cycle
        self._appended = False
        #: ends a linger: set when stopping is seen (it stays set: no linger delays the final flush) and when an
        #: event arrives during one
        self._no_linger = asyncio.Event()
        self._lingering = False
        #: the outbox's count of appended events when this round began (``_event_waiting``)
        self._events_mark = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._cursor = UplinkCursor()
        self._events_acked = 0
        self._live_read = self._replay_read = self._events_read = 0
        self._live: list[_Flight] = []
        self._replay: list[_Flight] = []
        self._events: list[_Flight] = []
        self._replay_exhausted = False
        self._rewind_pending = False
        # the shared reconnect policy (gateway/reconnect.py) on the runner's clock: a fast first retry, doubling to
        # retry_max while the far side keeps refusing, reset by a delivered batch, one log line per outage and per
        # recovery
        self._retry = ReconnectPolicy(
            name,
            RetryTiming(first=delivery.retry_min, maximum=delivery.retry_max),
            clock=self.clock.monotonic,
            random=self._rng.random,
            logger=log,
        )
        self._retry_at = 0.0
        self._link_up = False
        self._acked_since_compact = False
        self._last_compact = 0.0
        self._stopping_phase = False
        self._last_depths: tuple[int, int, float] = (0, 0, 0.0)
        outbox.add_append_listener(self._on_append)
        if isinstance(uplink, ConnectionAware):
            uplink.on_connected = self._connection_restored

    def _on_append(self) -> None:
        self._appended = True
        self._wake.set()
        if self._lingering and self._event_waiting():
            self._no_linger.set()  # an alarm or a rule publication ends a telemetry linger in progress

    def _event_waiting(self) -> bool:
        """An event this uplink delivers was appended since the round began: it goes now, not after a linger."""
        return "events" in self.uplink.kinds and self.outbox.stats.appended_events != self._events_mark

    def _connection_restored(self) -> None:
        if self._retry_at > self.clock.monotonic():
            self._retry_at = 0.0  # the far side is back: retry now, not when the backoff would have ended
            self._wake.set()

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        await self._load_cursors()
        closing = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.uplink.maintain(closing), name=f"{self.name}.connection")
                watcher = tg.create_task(self._watch(stopping), name=f"{self.name}.stop-watch")
                try:
                    await self._deliver_until_stopped(stopping)
                finally:
                    closing.set()
                    watcher.cancel()
        finally:
            await self.uplink.close()
            self.state = "stopped"

    async def _watch(self, stopping: asyncio.Event) -> None:
        await stopping.wait()
        self._no_linger.set()  # a linger in progress ends now: the final flush has its own deadline
        self._wake.set()

    async def _load_cursors(self) -> None:
        if "telemetry" in self.uplink.kinds:
            await self.outbox.register_cursor(self.cursor_name, "telemetry")
            self._cursor = self.outbox.uplink_cursor(self.cursor_name)
        if "events" in self.uplink.kinds:
            self._events_acked = await self.outbox.register_cursor(self.cursor_name, "events")
        self._rewind()
        self._last_compact = self.clock.monotonic()
        self.state = "up"

    def _rewind(self) -> None:
        """Forget what was read but not acked; the next reads start again at the cursors."""
        self._live_read = self._cursor.live_to
        self._replay_read = self._cursor.delivered_to
        self._events_read = self._events_acked
        self._live.clear()
        self._replay.clear()
        self._events.clear()
        self._replay_exhausted = False
        self._rewind_pending = False

    async def _deliver_until_stopped(self, stopping: asyncio.Event) -> None:
        deadline: float | None = None
        while True:
            self._wake.clear()
            self._appended = False  # what was appended so far is read in this round
            self._events_mark = self.outbox.stats.appended_events
            now = self.clock.monotonic()
            if stopping.is_set() and deadline is None:
                deadline = now + self.final_flush
                self._stopping_phase = True
            if deadline is not None and now >= deadline:
                break
            if self._rewind_pending and not self._tasks:
                self._rewind()
            launched = 0
            if now >= self._retry_at and not self._rewind_pending:
                launched = await self._launch()
            if deadline is not None and not self._tasks and not launched and now >= self._retry_at:
                break  # final flush done: everything committed before the stop was delivered
            if self._acked_since_compact and now - self._last_compact >= COMPACT_EVERY:
                self._acked_since_compact = False
                self._last_compact = now
                await self.outbox.compact()
            if launched and len(self._tasks) < self.delivery.max_inflight:
                continue  # more may be ready to launch (a slot is still free)
            wait = IDLE_WAIT
            if self._retry_at > now:
                wait = min(wait, self._retry_at - now)
            if deadline is not None:
                wait = min(wait, max(deadline - now, 0.0))
            await self.clock.wait(self._wake, wait)
            if (
                self._appended
                and self.delivery.linger > 0
                and self._link_up
                and not self._stopping_phase
                and not self._cursor.has_backlog
                and not self._event_waiting()
            ):
                # Woken by new live data: the other devices' polls of this cycle are being committed now. One
                # request for all of them costs one outbox read, one cursor write and one task, where a request per
                # stored batch cost those for every device (issue 19: most of the platform uplink's CPU). Also while
                # a live request is in flight: with a free slot, each commit during its round trip launched a
                # request of its own. Never while a backlog replays: a linger there cut the replay rate to a third
                # (bench/outbox.py, 2026-12-03), and live data joins the next request anyway. Nor when an event came:
                # alarms and rule publications go at once (bench/latency.py: 119 ms to the subscriber with a linger).
                if not stopping.is_set():
                    self._no_linger.clear()  # set by the last event that ended a linger (a stop keeps it set)
                self._lingering = True
                try:
                    await self.clock.wait(self._no_linger, self.delivery.linger)
                finally:
                    self._lingering = False
        await self._finish_in_flight(deadline)

    async def _finish_in_flight(self, deadline: float | None) -> None:
        if self._tasks:
            remaining = 0.0 if deadline is None else max(0.0, deadline - self.clock.monotonic())
            _done, pending = await asyncio.wait(set(self._tasks), timeout=remaining)
            for task in pending:
                task.cancel()  # not acked: sent again after the restart, with the same ids
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if self._acked_since_compact:
            await self.outbox.compact()

    # -- choosing the next request ------------------------------------------------------------------------------

    async def _launch(self) -> int:
        launched = 0
        # Until a request is accepted (at start, after a failure) one request probes the link: a down server is not
        # hammered, and old data goes out strictly in order until the backlog can be opened.
        limit = self.delivery.max_inflight if self._link_up else 1
        while len(self._tasks) < limit and not self._rewind_pending:
            picked = self._next_events() or await self._next_live()
            if picked is None and not self._stopping_phase:
                picked = await self._next_replay()
            if picked is None:
                break
            stream, flight, batch = picked
            task = asyncio.create_task(self._run_request(stream, flight, batch), name=f"{self.name}.send")
            self._tasks.add(task)
            launched += 1
        return launched

    def _next_events(self) -> tuple[str, _Flight, UplinkBatch] | None:
        if "events" not in self.uplink.kinds or self._events:
            return None  # events go one request at a time, so they arrive in order
        stored = self.outbox.read_events(self._events_read, limit=self.delivery.batch_size)
        if not stored:
            return None
        flight = _Flight(stored[0].seq, stored[-1].seq)
        self._events.append(flight)
        self._events_read = flight.last
        return "events", flight, UplinkBatch("events", events=stored)

    async def _next_live(self) -> tuple[str, _Flight, UplinkBatch] | None:
        if "telemetry" not in self.uplink.kinds:
            return None
        window_ns = int(self.delivery.live_window * 1e9)
        now_ns = self.clock.time_ns()
        # The backlog is opened only once the link is proven (a request accepted since the last failure): while it
        # is down, or before the first success, old data goes out in order, so a backlog never starts mid-outage
        # and live data after it is really live.
        rows = self.outbox.read_telemetry_upto(self._live_read, upto_seq=None, max_samples=self.delivery.batch_size)
        if not rows:
            return None
        if (
            rows[0].created_ns < now_ns - window_ns
            and self._link_up
            and not self._cursor.has_backlog
            and not self._live
            and not self._stopping_phase
        ):
            # what is stored from here is old: it becomes backlog, and live data starts after it (read once: a
            # separate peek decoded a whole stored batch on every launch, issue 19)
            await self._open_backlog()
            rows = self.outbox.read_telemetry_upto(self._live_read, upto_seq=None, max_samples=self.delivery.batch_size)
            if not rows:
                return None
        flight = _Flight(rows[0].seq, rows[-1].seq)
        self._live.append(flight)
        self._live_read = flight.last
        historical = rows[0].created_ns < now_ns - window_ns
        return "live", flight, UplinkBatch("telemetry", historical=historical, telemetry=rows)

    async def _open_backlog(self) -> None:
        """Everything stored up to now becomes backlog, replayed behind live data. Persisted before any live
        request, so a crash can never take the backlog for delivered."""
        head = self.outbox.last_seq("telemetry")
        low = self._cursor.live_to
        await self.outbox.move_cursors(self.cursor_name, {"telemetry.gap": head, "telemetry.live": head})
        self._cursor = UplinkCursor(low, head, head)
        self._live_read = head
        self._replay_read = low
        self._replay_exhausted = False
        backlog, _oldest = self.outbox.pending_telemetry(low, head)
        log.info("%s: %d samples of backlog, replayed behind live data and flagged historical", self.name, backlog)

    async def _next_replay(self) -> tuple[str, _Flight, UplinkBatch] | None:
        if not self._cursor.has_backlog or self._replay_exhausted or len(self._replay) >= self._replay_slots:
            return None
        rows = self.outbox.read_telemetry_upto(
            self._replay_read, upto_seq=self._cursor.gap_end, max_samples=self.delivery.batch_size
        )
        if not rows:
            self._replay_exhausted = True
            await self._advance_replay()
            return None
        flight = _Flight(rows[0].seq, rows[-1].seq)
        self._replay.append(flight)
        self._replay_read = flight.last
        return "replay", flight, UplinkBatch("telemetry", historical=True, telemetry=rows)

    # -- one request --------------------------------------------------------------------------------------------

    async def _run_request(self, stream: str, flight: _Flight, batch: UplinkBatch) -> None:
        task = asyncio.current_task()
        try:
            await self._deliver(batch)
        except UplinkError as exc:
            self._on_failure(str(exc))
            return
        except Exception as exc:  # a bug in an uplink must not stop delivery for good: log it, back off, retry
            log.exception("%s: unexpected error while sending", self.name)
            self._on_failure(f"unexpected {type(exc).__name__}: {exc}")
            return
        finally:
            if task is not None:
                self._tasks.discard(task)
            self._wake.set()
        self._on_success()
        flight.done = True
        if stream == "events":
            await self._advance_events()
        elif stream == "live":
            await self._advance_live()
        else:
            await self._advance_replay()

    async def _deliver(self, batch: UplinkBatch) -> None:
        """Send ``batch``; split it around records the far side refuses for good, quarantining those alone."""
        try:
            async with asyncio.timeout(self.delivery.timeout):
                await self.uplink.send(batch)
        except TimeoutError:
            raise UplinkError(f"no answer within {self.delivery.timeout:g}s", retryable=True) from None
        except UplinkError as exc:
            if exc.retryable:
                raise
            halves = batch.split()
            if halves is None:
                self.counters.quarantined += batch.size
                log.warning(
                    "%s: quarantined (the far side refuses it for good): %s: %s", self.name, batch.describe()[:300], exc
                )
                return
            for half in halves:
                await self._deliver(half)
            return
        self.counters.requests_ok += 1
        if batch.kind == "events":
            self.counters.sent_events += batch.size
        else:
            self.counters.sent_samples += batch.size
            if batch.historical:
                self.counters.replayed_samples += batch.size

    def _on_failure(self, message: str) -> None:
        self.counters.requests_failed += 1
        self._link_up = False
        self._rewind_pending = True
        if self._retry.down and message != self.last_error:
            log.debug("%s: still failing: %s", self.name, message)
        delay = self._retry.failed(f"delivery failing ({message}), the data stays in the outbox")
        self._retry_at = max(self._retry_at, self.clock.monotonic() + delay)
        self.counters.retries += 1
        self.last_error = message
        self.state = "retrying"

    def _on_success(self) -> None:
        self._retry.succeeded()
        self._link_up = True
        self.state = "up"

    # -- acks ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _pop_done(flights: list[_Flight]) -> int | None:
        last = None
        while flights and flights[0].done:
            last = flights.pop(0).last
        return last

    async def _advance_events(self) -> None:
        last = self._pop_done(self._events)
        if last is not None and last > self._events_acked:
            self._events_acked = last
            self._acked_since_compact = True
            await self.outbox.move_cursors(self.cursor_name, {"events": last})

    async def _advance_live(self) -> None:
        last = self._pop_done(self._live)
        if last is None or last <= self._cursor.live_to:
            return
        c = self._cursor
        if c.has_backlog:
            self._cursor = UplinkCursor(c.delivered_to, c.gap_end, last)
            await self.outbox.move_cursors(self.cursor_name, {"telemetry.live": last})
        else:
            self._cursor = UplinkCursor(last, last, last)
            self._acked_since_compact = True
            await self.outbox.move_cursors(
                self.cursor_name, {"telemetry": last, "telemetry.gap": last, "telemetry.live": last}
            )

    async def _advance_replay(self) -> None:
        last = self._pop_done(self._replay)
        c = self._cursor
        if not c.has_backlog:
            return
        reached = max(c.delivered_to, last or 0)
        if (self._replay_exhausted and not self._replay) or reached >= c.gap_end:
            # Backlog delivered: the gap closes and the cursor is one position again.
            self._cursor = UplinkCursor(c.live_to, c.live_to, c.live_to)
            self._acked_since_compact = True
            await self.outbox.move_cursors(
                self.cursor_name, {"telemetry": c.live_to, "telemetry.gap": c.live_to, "telemetry.live": c.live_to}
            )
            log.info("%s: backlog replayed", self.name)
            return
        if reached > c.delivered_to:
            self._cursor = UplinkCursor(reached, c.gap_end, c.live_to)
            self._acked_since_compact = True
            await self.outbox.move_cursors(self.cursor_name, {"telemetry": reached})

    # -- reporting ----------------------------------------------------------------------------------------------

    def _queue_depths(self) -> tuple[int, int, float]:
        now_ns = self.clock.time_ns()
        depth = 0
        oldest: int | None = None
        if "telemetry" in self.uplink.kinds:
            c = self._cursor
            depth, oldest = self.outbox.pending_telemetry(c.live_to)
            if c.has_backlog:
                gap_depth, gap_oldest = self.outbox.pending_telemetry(c.delivered_to, c.gap_end)
                depth += gap_depth
                oldest = gap_oldest if gap_oldest is not None else oldest
        events_depth, events_oldest = 0, None
        if "events" in self.uplink.kinds:
            events_depth, events_oldest = self.outbox.pending_events(self._events_acked)
        ages = [now_ns - t for t in (oldest, events_oldest) if t is not None]
        return depth, events_depth, round(max(ages) / 1e9, 3) if ages else 0.0

    def status(self) -> UplinkStatus:
        """Queue metrics for /api/uplinks and /metrics: depth, age of the oldest record, sent, dropped, replayed."""
        try:
            depth, events_depth, oldest_age = self._queue_depths()
            self._last_depths = (depth, events_depth, oldest_age)
        except StoreError:  # the outbox is closed (shutting down): report the last figures seen
            depth, events_depth, oldest_age = self._last_depths
        status: UplinkStatus = {
            "name": self.name,
            "state": self.state,
            "backlog_samples": depth,
            "backlog_events": events_depth,
            "replaying": self._cursor.has_backlog,
            "oldest_age_s": oldest_age,
            "sent_samples": self.counters.sent_samples,
            "sent_events": self.counters.sent_events,
            "replayed_samples": self.counters.replayed_samples,
            "dropped_samples": self.outbox.stats.dropped_by_cursor.get(self.cursor_name, 0),
            "quarantined": self.counters.quarantined,
            "requests_ok": self.counters.requests_ok,
            "requests_failed": self.counters.requests_failed,
            "in_flight": len(self._tasks),
            "retry_in_s": round(max(0.0, self._retry_at - self.clock.monotonic()), 3),
            "last_error": self.last_error,
        }
        if isinstance(self.uplink, BrokerReporting):
            broker = self.uplink.broker_status()
            status["broker"] = str(broker["broker"])
            status["failovers"] = int(broker["failovers"])
        return status


def build_uplinks(
    site: Site,
    outbox: Outbox,
    *,
    commands: CommandHandler,
    data_dir: Path | None = None,
    time_ns: Callable[[], int] = time.time_ns,
) -> list[UplinkRunnerPart]:
    """One runner per configured uplink, built by its plugin (gateway/plugins.py), in the registry's order. Protocol
    libraries are imported by the plugins, only for what is configured.

    Platform commands are journalled in ``<data_dir>/commands.db`` (by default beside the outbox)."""
    from gateway.plugins import UplinkContext, plugins

    context = UplinkContext(site=site, outbox=outbox, commands=commands, data_dir=data_dir, time_ns=time_ns)
    runners: list[UplinkRunnerPart] = []
    for name, plugin in plugins().uplinks.items():
        config = site.config.uplinks.configured(name)
        if config is not None:
            runners.append(plugin.build(config, context))
    return runners
