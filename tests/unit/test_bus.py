"""The bus: fan-out, back-pressure for blocking subscribers, counted drops for viewers, draining on close."""

from __future__ import annotations

import asyncio

import pytest

from gateway.bus import Bus, BusClosed
from gateway.model import Sample


def _batch(i: int, n: int = 3) -> list[Sample]:
    return [Sample(f"d{i}.p{j}", float(j), i) for j in range(n)]


async def test_every_subscriber_gets_every_batch_in_order() -> None:
    bus = Bus()
    a = bus.subscribe("a")
    b = bus.subscribe("b")
    tapped: list[int] = []
    bus.tap(lambda batch: tapped.append(batch[0].ts))
    for i in range(5):
        await bus.publish(_batch(i))
    bus.close()
    got_a = [batch[0].ts async for batch in a]
    got_b = [batch[0].ts async for batch in b]
    assert got_a == got_b == tapped == [0, 1, 2, 3, 4]


async def test_slow_blocking_subscriber_slows_the_publisher_and_loses_nothing() -> None:
    bus = Bus()
    slow = bus.subscribe("outbox", maxsize=2)
    received: list[int] = []

    async def consume() -> None:
        async for batch in slow:
            received.append(batch[0].ts)
            await asyncio.sleep(0)  # a consumer slower than the producer: yields once per batch

    consumer = asyncio.ensure_future(consume())
    for i in range(50):
        await bus.publish(_batch(i))
        assert slow.depth() <= 2  # bounded: the publisher waited instead of growing the queue
    bus.close()
    await consumer
    assert received == list(range(50))
    assert slow.stats.dropped_batches == 0
    assert slow.stats.delivered_samples == 150


async def test_publisher_waits_while_the_queue_is_full() -> None:
    bus = Bus()
    sub = bus.subscribe("outbox", maxsize=1)
    await bus.publish(_batch(0))
    second = asyncio.ensure_future(bus.publish(_batch(1)))
    await asyncio.sleep(0.01)
    assert not second.done()  # back-pressure: blocked, not dropped
    iterator = aiter(sub)
    first = await anext(iterator)
    assert first[0].ts == 0
    await asyncio.wait_for(second, 1)
    assert (await anext(iterator))[0].ts == 1
    assert sub.stats.blocked_seconds > 0


async def test_viewer_drops_oldest_and_counts_it_without_holding_back_others() -> None:
    bus = Bus()
    store = bus.subscribe("outbox", maxsize=100)
    viewer = bus.subscribe("tail", maxsize=2, policy="drop_oldest")
    for i in range(10):
        await asyncio.wait_for(bus.publish(_batch(i)), 1)  # never blocks on the viewer
    assert viewer.stats.dropped_batches == 8
    assert viewer.stats.dropped_samples == 24
    bus.close()
    assert [b[0].ts async for b in viewer] == [8, 9]
    assert len([b async for b in store]) == 10


async def test_closed_bus_refuses_publishing_and_subscribers_drain() -> None:
    bus = Bus()
    sub = bus.subscribe("a")
    await bus.publish(_batch(1))
    bus.close()
    with pytest.raises(BusClosed):
        await bus.publish(_batch(2))
    assert [b[0].ts async for b in sub] == [1]
    late = bus.subscribe("late")
    assert [b async for b in late] == []


async def test_close_releases_a_blocked_publisher() -> None:
    bus = Bus()
    bus.subscribe("stuck", maxsize=1)
    await bus.publish(_batch(0))
    blocked = asyncio.ensure_future(bus.publish(_batch(1)))
    await asyncio.sleep(0.01)
    bus.close()
    await asyncio.wait_for(blocked, 1)


def test_queue_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Bus().subscribe("x", maxsize=0)


async def test_take_queued_hands_over_what_waits_within_a_sample_budget_in_order() -> None:
    bus = Bus()
    sub = bus.subscribe("outbox", maxsize=4)
    for i in range(4):
        await bus.publish(_batch(i, n=3))
    blocked = asyncio.ensure_future(bus.publish(_batch(4, n=3)))  # the queue is full: the publisher waits
    await asyncio.sleep(0)
    assert not blocked.done()
    taken = sub.take_queued(7)  # room for two batches of three, not a third
    assert [b[0].ts for b in taken] == [0, 1]
    await asyncio.wait_for(blocked, 1)  # taking made room
    assert [b[0].ts for b in sub.take_queued(100)] == [2, 3, 4]
    assert sub.take_queued(100) == [] and sub.take_queued(0) == []
    assert (sub.stats.delivered_batches, sub.stats.delivered_samples) == (5, 15)
