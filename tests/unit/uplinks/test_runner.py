"""The uplink runner on a fake clock with a recording uplink: ordering, acks, backoff, live-first replay,
quarantine, events, final flush, and positions that survive a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.errors import UplinkError
from gateway.model import Event
from gateway.outbox import Outbox, UplinkCursor
from gateway.uplinks.config import DeliveryConfig
from gateway.uplinks.runner import UplinkRunner
from tests.unit.uplinks.helpers import FakeClock, RecordingUplink, make_samples, open_outbox, until

DELIVERY = DeliveryConfig(batch_size=100, max_inflight=2, replay_share=0.5, live_window=10, retry_min=0.5, retry_max=8)


def make_runner(
    outbox: Outbox, uplink: RecordingUplink, clock: FakeClock, delivery: DeliveryConfig = DELIVERY
) -> UplinkRunner:
    return UplinkRunner("uplink[test]", uplink, outbox, delivery, cursor_name="test", clock=clock, final_flush=0.5)


async def start(runner: UplinkRunner) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stopping = asyncio.Event()
    return stopping, asyncio.create_task(runner.run(stopping))


async def test_delivers_in_order_and_acks_up_to_the_last_batch(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = open_outbox(tmp_path, clock)
    for i in range(5):
        await outbox.append(make_samples(i * 50, 50))
    uplink = RecordingUplink(clock=clock)
    runner = make_runner(outbox, uplink, clock)
    stopping, task = await start(runner)
    await until(lambda: len(uplink.samples()) == 250 and outbox.uplink_cursor("test").delivered_to == 5)
    stopping.set()
    await task
    assert [s.value for s in uplink.samples()] == [float(i) for i in range(250)]
    assert not any(b.historical for b in uplink.accepted)
    assert outbox.uplink_cursor("test") == UplinkCursor(5, 5, 5)
    assert runner.status()["sent_samples"] == 250
    assert runner.status()["backlog_samples"] == 0
    assert uplink.closed
    await outbox.close()


async def test_retryable_failures_back_off_exponentially_with_jitter_then_deliver_everything(tmp_path: Path) -> None:
    clock = FakeClock(auto_advance=True)
    outbox = open_outbox(tmp_path, clock)
    await outbox.append(make_samples(0, 80))
    uplink = RecordingUplink(clock=clock)
    uplink.fail_with = UplinkError("connection refused", retryable=True)
    delivery = DELIVERY.model_copy(update={"max_inflight": 1})
    runner = make_runner(outbox, uplink, clock, delivery)
    stopping, task = await start(runner)
    await until(lambda: uplink.attempts >= 7)
    status = runner.status()
    assert status["state"] == "retrying"
    assert status["last_error"] == "connection refused"
    assert status["backlog_samples"] == 80
    gaps = [b - a for a, b in zip(uplink.attempt_times, uplink.attempt_times[1:], strict=False)][:6]
    expected = [min(8.0, 0.5 * 2**k) for k in range(6)]  # 0.5, 1, 2, 4, 8, 8 (capped)
    for gap, base in zip(gaps, expected, strict=True):  # the shared policy's jitter: +-20 %
        assert base * 0.8 - 1e-9 <= gap <= base * 1.2 + 1e-9, (gaps, expected)
    uplink.fail_with = None
    await until(lambda: len(uplink.samples()) == 80)
    stopping.set()
    await task
    assert [s.value for s in uplink.samples()] == [float(i) for i in range(80)]
    assert runner.status()["state"] == "stopped"
    assert outbox.uplink_cursor("test").delivered_to == 1
    await outbox.close()


async def test_old_data_is_replayed_behind_live_data_flagged_historical_and_survives_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = open_outbox(tmp_path, clock)
    for i in range(3):
        await outbox.append(make_samples(i * 100, 100))  # stored during an outage
    clock.advance(60)  # the outage lasted a minute: these records are now older than the live window
    uplink = RecordingUplink(clock=clock)
    uplink.hold = lambda batch: batch.historical and batch.first_seq > 1  # the replay is slow
    uplink.backlog_gate.clear()
    runner = make_runner(outbox, uplink, clock)
    stopping, task = await start(runner)
    # The oldest batch goes first, in order, proving the link; then the rest becomes backlog, persisted as a gap
    # before any live request.
    await until(lambda: outbox.uplink_cursor("test").has_backlog)
    assert outbox.uplink_cursor("test") == UplinkCursor(1, 3, 3)
    assert [s.value for s in uplink.samples(historical=True)] == [float(i) for i in range(100)]

    await outbox.append(make_samples(1000, 10))  # live data while the backlog waits
    await until(lambda: outbox.uplink_cursor("test").live_to == 4)
    assert [s.value for s in uplink.samples(historical=False)] == [float(i) for i in range(1000, 1010)]
    assert len(uplink.samples(historical=True)) == 100  # live overtook the backlog
    assert runner.status()["replaying"] is True
    stopping.set()  # stop mid-replay: the backlog request in flight is abandoned, not acked
    await task
    assert outbox.uplink_cursor("test") == UplinkCursor(1, 3, 4)

    restarted = RecordingUplink(clock=clock)
    runner2 = make_runner(outbox, restarted, clock)
    stopping2, task2 = await start(runner2)
    await until(lambda: outbox.uplink_cursor("test") == UplinkCursor(4, 4, 4))
    stopping2.set()
    await task2
    assert [s.value for s in restarted.samples()] == [float(i) for i in range(100, 300)]  # the backlog, only
    assert all(b.historical for b in restarted.accepted)
    assert runner2.status()["replayed_samples"] == 200


async def test_no_backlog_is_opened_while_the_link_is_down_so_data_stays_in_order(tmp_path: Path) -> None:
    clock = FakeClock(auto_advance=True)
    outbox = open_outbox(tmp_path, clock)
    uplink = RecordingUplink(clock=clock)
    runner = make_runner(outbox, uplink, clock, DELIVERY.model_copy(update={"batch_size": 10}))
    stopping, task = await start(runner)
    uplink.fail_with = UplinkError("broker down", retryable=True)
    for i in range(6):
        await outbox.append(make_samples(i * 10, 10))
        clock.advance(20)  # each poll is older than the live window by the time the link is back
    await until(lambda: uplink.attempts >= 4)
    assert not outbox.uplink_cursor("test").has_backlog
    uplink.fail_with = None
    await until(lambda: len(uplink.samples()) >= 60)
    stopping.set()
    await task
    values = [s.value for s in uplink.samples()]
    assert sorted(set(values)) == [float(i) for i in range(60)]
    assert values == sorted(values)  # oldest first, whatever became backlog after the link came back


async def test_replay_uses_at_most_its_share_of_the_in_flight_requests(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = open_outbox(tmp_path, clock)
    for i in range(10):
        await outbox.append(make_samples(i * 100, 100))
    clock.advance(60)
    uplink = RecordingUplink(clock=clock)
    uplink.hold = lambda batch: batch.historical and batch.first_seq > 1  # the first one proves the link
    uplink.backlog_gate.clear()
    delivery = DELIVERY.model_copy(update={"max_inflight": 4, "replay_share": 0.5})
    runner = make_runner(outbox, uplink, clock, delivery)
    stopping, task = await start(runner)
    await until(lambda: uplink.attempts >= 3)
    for _ in range(50):
        await asyncio.sleep(0)
    assert runner.status()["in_flight"] == 2  # 2 of 4 slots: the rest stay free for live data
    uplink.backlog_gate.set()
    await until(lambda: len(uplink.samples()) == 1000)
    stopping.set()
    await task
    assert [s.value for s in uplink.samples()] == [float(i) for i in range(1000)]
    await outbox.close()


async def test_a_point_the_far_side_refuses_is_quarantined_and_the_rest_of_its_batch_arrives(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = open_outbox(tmp_path, clock)
    await outbox.append(make_samples(0, 100))
    uplink = RecordingUplink(clock=clock)
    uplink.refuse = lambda sample: sample.value == 42.0
    runner = make_runner(outbox, uplink, clock)
    stopping, task = await start(runner)
    await until(lambda: outbox.uplink_cursor("test").delivered_to == 1)
    stopping.set()
    await task
    delivered = sorted(s.value for s in uplink.samples() if isinstance(s.value, float))
    assert delivered == [float(i) for i in range(100) if i != 42]
    assert runner.status()["quarantined"] == 1
    assert uplink.attempts < 30  # bisection: about 2*log2(100) requests, not one per sample
    await outbox.close()


async def test_events_go_in_order_on_their_own_cursor_and_not_to_telemetry_only_uplinks(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = open_outbox(tmp_path, clock)
    events = [Event(f"ev-{i}", "alarm", "zone3.co2", i, {"n": i}) for i in range(7)]
    await outbox.append_events(events)
    await outbox.append(make_samples(0, 5))
    both = RecordingUplink(clock=clock)
    telemetry_only = RecordingUplink(frozenset({"telemetry"}), clock=clock)
    runner_a = make_runner(outbox, both, clock)
    runner_b = UplinkRunner("uplink[tsdb]", telemetry_only, outbox, DELIVERY, cursor_name="tsdb", clock=clock)
    stop_a, task_a = await start(runner_a)
    stop_b, task_b = await start(runner_b)
    await until(lambda: outbox.cursor("test", "events") == 7 and len(telemetry_only.samples()) == 5)
    stop_a.set()
    stop_b.set()
    await asyncio.gather(task_a, task_b)
    sent_ids = [s.event.id for b in both.accepted if b.kind == "events" for s in b.events]
    assert sent_ids == [e.id for e in events]
    assert all(b.kind == "telemetry" for b in telemetry_only.accepted)
    assert runner_a.status()["sent_events"] == 7
    await outbox.close()


async def test_stop_flushes_what_was_committed_then_returns(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = open_outbox(tmp_path, clock)
    uplink = RecordingUplink(clock=clock)
    runner = make_runner(outbox, uplink, clock)
    stopping, task = await start(runner)
    await outbox.append(make_samples(0, 30))
    stopping.set()
    await task
    assert len(uplink.samples()) == 30
    assert outbox.uplink_cursor("test").delivered_to == 1
    await outbox.close()


async def test_a_send_that_never_answers_times_out_and_is_retried(tmp_path: Path) -> None:
    clock = FakeClock(auto_advance=True)
    outbox = open_outbox(tmp_path, clock)
    await outbox.append(make_samples(0, 3))
    uplink = RecordingUplink(clock=clock)
    hang = asyncio.Event()
    original_send = uplink.send

    async def hang_once(batch):  # type: ignore[no-untyped-def]
        if not hang.is_set():
            hang.set()
            await asyncio.Event().wait()
        await original_send(batch)

    uplink.send = hang_once  # type: ignore[method-assign]
    runner = make_runner(outbox, uplink, clock, DELIVERY.model_copy(update={"timeout": 0.05}))
    stopping, task = await start(runner)
    await asyncio.wait_for(until(lambda: len(uplink.samples()) == 3, steps=10**7), timeout=5)
    stopping.set()
    await task
    assert runner.counters.requests_failed == 1
    assert "no answer within 0.05s" in (runner.last_error or "")
    await outbox.close()


def test_an_uplink_with_no_stream_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="delivers no stream"):
        UplinkRunner("uplink[x]", RecordingUplink(frozenset()), None, DELIVERY, cursor_name="x")  # type: ignore[arg-type]


class ReconnectingUplink(RecordingUplink):
    """Has a lasting connection, like the MQTT uplink: the runner hands it a callback for reconnections."""

    on_connected: Callable[[], None] | None = None


async def test_a_connection_coming_back_cuts_the_backoff_short(tmp_path: Path) -> None:
    clock = FakeClock()  # time at real speed: a 30 s backoff cannot end during this test
    outbox = open_outbox(tmp_path, clock)
    await outbox.append(make_samples(0, 10))
    uplink = ReconnectingUplink(clock=clock)
    uplink.fail_with = UplinkError("broker down", retryable=True)
    runner = make_runner(outbox, uplink, clock, DELIVERY.model_copy(update={"retry_min": 30, "retry_max": 60}))
    assert uplink.on_connected is not None
    stopping, task = await start(runner)
    await until(lambda: runner.status()["state"] == "retrying")
    assert runner.status()["retry_in_s"] >= 15
    uplink.fail_with = None
    uplink.on_connected()
    await until(lambda: len(uplink.samples()) == 10)
    stopping.set()
    await task
    assert uplink.attempts == 2
    await outbox.close()


class LingerClock(FakeClock):
    """Holds the runner in its linger until the test opens ``gate``; every other wait as FakeClock."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.lingers: list[float] = []
        self.linger_event: asyncio.Event | None = None

    async def wait(self, event: asyncio.Event, seconds: float) -> bool:
        if event is self.linger_event:
            self.lingers.append(seconds)
            # the linger's time never runs out here: it ends when the test opens the gate, or the runner ends it
            waiters = {asyncio.ensure_future(self.gate.wait()), asyncio.ensure_future(event.wait())}
            _done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in pending:
                waiter.cancel()
            return event.is_set()
        return await super().wait(event, seconds)


async def test_polls_committed_while_the_runner_lingers_leave_in_one_request(tmp_path: Path) -> None:
    clock = LingerClock()
    outbox = open_outbox(tmp_path, clock)
    uplink = RecordingUplink(clock=clock)
    runner = make_runner(outbox, uplink, clock, DELIVERY.model_copy(update={"linger": 0.25, "batch_size": 1000}))
    clock.linger_event = runner._no_linger
    stopping, task = await start(runner)
    await outbox.append(make_samples(0, 5))
    await until(lambda: len(uplink.accepted) == 1)  # the link is not proven yet: no linger before the first request
    assert clock.lingers == []
    await outbox.append(make_samples(5, 5))  # a new poll cycle starts: the runner waits for the rest of it
    await until(lambda: clock.lingers == [0.25])
    for i in range(2, 20):  # the other devices' polls of the cycle, committed during the linger
        await outbox.append(make_samples(i * 5, 5))
    assert len(uplink.accepted) == 1
    clock.gate.set()
    await until(lambda: outbox.uplink_cursor("test").delivered_to == 20)
    assert [len(b.telemetry) for b in uplink.accepted] == [1, 19]  # one request for 19 stored batches, not 19
    assert [s.value for s in uplink.samples()] == [float(i) for i in range(100)]
    stopping.set()
    await task
    await outbox.close()


async def test_polls_committed_during_a_live_request_wait_for_the_linger_too(tmp_path: Path) -> None:
    # with a free in-flight slot, each commit during a live request's round trip used to launch a request of its own
    clock = LingerClock()
    outbox = open_outbox(tmp_path, clock)
    uplink = RecordingUplink(clock=clock)
    runner = make_runner(outbox, uplink, clock, DELIVERY.model_copy(update={"linger": 0.25, "max_inflight": 4}))
    clock.linger_event = runner._no_linger
    stopping, task = await start(runner)
    await outbox.append(make_samples(0, 5))
    await until(lambda: len(uplink.accepted) == 1)  # proves the link
    clock.gate.set()
    uplink.hold = lambda batch: batch.first_seq == 2  # the next request stays in flight until released
    uplink.backlog_gate.clear()
    await outbox.append(make_samples(5, 5))
    await until(lambda: len(runner._tasks) == 1)
    lingers = len(clock.lingers)
    clock.gate.clear()
    for i in range(2, 8):  # committed while that request is in flight
        await outbox.append(make_samples(i * 5, 5))
    await until(lambda: len(clock.lingers) == lingers + 1)  # the runner lingers instead of launching at once
    assert len(runner._tasks) == 1
    clock.gate.set()
    uplink.backlog_gate.set()
    await until(lambda: outbox.uplink_cursor("test").delivered_to == 8)
    assert [len(b.telemetry) for b in uplink.accepted] == [1, 1, 6]  # the six commits in one request
    assert [s.value for s in uplink.samples()] == [float(i) for i in range(40)]
    stopping.set()
    await task
    await outbox.close()


async def test_an_event_is_sent_at_once_not_after_a_linger(tmp_path: Path) -> None:
    # alarms and rule publications must not wait for the rest of a poll cycle
    clock = LingerClock()
    outbox = open_outbox(tmp_path, clock)
    uplink = RecordingUplink(clock=clock)
    runner = make_runner(outbox, uplink, clock, DELIVERY.model_copy(update={"linger": 0.25}))
    clock.linger_event = runner._no_linger
    stopping, task = await start(runner)
    await outbox.append(make_samples(0, 5))
    await until(lambda: len(uplink.accepted) == 1)  # proves the link
    await outbox.append_events([Event("alarm-1", "alarm", "zone3.co2", 1, {"n": 1})])
    await until(lambda: outbox.cursor("test", "events") == 1)  # delivered while the gate stays closed
    assert clock.lingers == []
    await outbox.append(make_samples(5, 5))  # telemetry still lingers
    await until(lambda: clock.lingers == [0.25])
    # an alarm during that linger ends it: the alarm and the lingering telemetry go now, the gate still closed
    await outbox.append_events([Event("alarm-2", "alarm", "zone3.co2", 2, {"n": 2})])
    await until(lambda: outbox.cursor("test", "events") == 2)
    await until(lambda: outbox.uplink_cursor("test").delivered_to == 2)
    assert not clock.gate.is_set()
    clock.gate.set()
    stopping.set()
    await task
    await outbox.close()


async def test_no_linger_while_a_backlog_replays(tmp_path: Path) -> None:
    # Live data committed during a replay joins the next request anyway; a linger there held the replay back (the
    # outbox bench's replay fell to a third, 2026-12-03)
    clock = LingerClock()
    clock.gate.set()  # a linger, if one happened, would not block: it is only counted
    outbox = open_outbox(tmp_path, clock)
    for i in range(3):
        await outbox.append(make_samples(i * 100, 100))  # stored during an outage
    clock.advance(60)  # older than the live window: a backlog
    uplink = RecordingUplink(clock=clock)
    uplink.hold = lambda batch: batch.historical and batch.first_seq > 1  # the replay is slow
    uplink.backlog_gate.clear()
    runner = make_runner(outbox, uplink, clock, DELIVERY.model_copy(update={"linger": 0.25}))
    clock.linger_event = runner._no_linger
    stopping, task = await start(runner)
    await until(lambda: outbox.uplink_cursor("test").has_backlog)
    for k in range(5):  # live polls while the backlog replays
        await outbox.append(make_samples(1000 + k * 10, 10))
    await until(lambda: outbox.uplink_cursor("test").live_to == 8)
    assert clock.lingers == []
    uplink.backlog_gate.set()
    await until(lambda: not outbox.uplink_cursor("test").has_backlog)
    stopping.set()
    await task
    await outbox.close()


async def test_a_stop_ends_a_linger_at_once(tmp_path: Path) -> None:
    clock = LingerClock()
    outbox = open_outbox(tmp_path, clock)
    uplink = RecordingUplink(clock=clock)
    runner = make_runner(outbox, uplink, clock, DELIVERY.model_copy(update={"linger": 10.0}))
    clock.linger_event = runner._no_linger
    stopping, task = await start(runner)
    await outbox.append(make_samples(0, 5))
    await until(lambda: len(uplink.accepted) == 1)
    await outbox.append(make_samples(5, 5))
    await until(lambda: clock.lingers == [10.0])
    stopping.set()
    await until(runner._no_linger.is_set)  # the linger's event: set by the stop, so the 10 s wait ends now
    clock.gate.set()
    await task
    assert [s.value for s in uplink.samples()] == [float(i) for i in range(10)]  # the final flush sent the rest
    await outbox.close()
