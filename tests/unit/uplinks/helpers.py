"""Seams for runner tests: a fake clock (no sleeping) and a scriptable uplink that records what it was sent."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from gateway.errors import UplinkError
from gateway.model import Quality, Sample
from gateway.outbox import Outbox
from gateway.reconnect import Clock
from gateway.uplinks.base import StreamKind, UplinkBatch

T0_NS = 1_795_000_000 * 10**9


class FakeClock(Clock):
    """Time moves only by ``advance``, or, with ``auto_advance``, when the runner waits and nothing wakes it: then
    it jumps by the whole wait (a backoff of 8 s takes no real time). Without it a wait is a short real pause and
    time moves at real speed, so records appended meanwhile (the outbox commits on its own thread) do not look
    minutes old."""

    def __init__(self, *, auto_advance: bool = False) -> None:
        self.auto_advance = auto_advance
        self.now = 1000.0
        self.wall_ns = T0_NS
        self.waits: list[float] = []

    def time_ns(self) -> int:
        return self.wall_ns + int((self.now - 1000.0) * 1e9)

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def wait(self, event: asyncio.Event, seconds: float) -> bool:
        for _ in range(5):  # let tasks that are ready (sends, acks) run first
            if event.is_set():
                return True
            await asyncio.sleep(0)
        if event.is_set():
            return True
        self.waits.append(seconds)
        if not self.auto_advance:
            pause = min(seconds, 0.005)
            try:
                await asyncio.wait_for(event.wait(), pause)
            except TimeoutError:
                self.now += pause  # at real speed, so a final-flush deadline still comes
                return False
            return True
        self.now += seconds
        return False


class RecordingUplink:
    """Records every accepted batch; ``fail_with`` makes the next sends fail; ``refuse`` rejects some samples."""

    def __init__(
        self, kinds: frozenset[StreamKind] = frozenset({"telemetry", "events"}), *, clock: FakeClock | None = None
    ) -> None:
        self.kinds = kinds
        self.clock = clock
        self.attempt_times: list[float] = []
        #: while cleared, batches ``hold`` selects (historical ones by default) wait here: lets a test watch live
        #: data overtake a replay
        self.backlog_gate = asyncio.Event()
        self.backlog_gate.set()
        self.hold: Callable[[UplinkBatch], bool] = lambda batch: batch.historical
        self.accepted: list[UplinkBatch] = []
        self.attempts = 0
        self.fail_with: UplinkError | None = None
        self.refuse: Callable[[Sample], bool] = lambda _s: False
        self.closed = False

    async def send(self, batch: UplinkBatch) -> None:
        self.attempts += 1
        if self.clock is not None:
            self.attempt_times.append(self.clock.monotonic())
        if self.hold(batch):
            await self.backlog_gate.wait()
        await asyncio.sleep(0)
        if self.fail_with is not None:
            raise self.fail_with
        if any(self.refuse(s) for s in batch.samples()):
            raise UplinkError("HTTP 400: malformed point", retryable=False)
        self.accepted.append(batch)

    async def maintain(self, closing: asyncio.Event) -> None:
        await closing.wait()

    async def close(self) -> None:
        self.closed = True

    def samples(self, *, historical: bool | None = None) -> list[Sample]:
        return [
            s
            for b in self.accepted
            if b.kind == "telemetry" and (historical is None or b.historical == historical)
            for s in b.samples()
        ]


def make_samples(start: int, count: int, point: str = "m1.power_kw") -> list[Sample]:
    return [Sample(point, float(i), T0_NS + i * 1_000_000, Quality.GOOD) for i in range(start, start + count)]


async def until(condition: Callable[[], bool], *, steps: int = 20_000) -> None:
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def open_outbox(tmp_path: Path, clock: FakeClock | None = None, **kwargs: object) -> Outbox:
    """An outbox stamping records by ``clock`` (the runner judges a record's age by that stamp)."""
    stamp = clock.time_ns if clock is not None else None
    if stamp is not None:
        kwargs["time_ns"] = stamp
    return Outbox(tmp_path / "outbox.db", **kwargs)  # type: ignore[arg-type]
