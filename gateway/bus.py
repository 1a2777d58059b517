"""The sample bus: fans each batch out to every subscriber, with bounded queues and explicit back-pressure.

Owns subscription queues only; knows nothing of drivers, rules or storage.

Each subscriber has a bounded queue of *batches* and a policy for when it is full:

* ``block`` (the default, for the outbox and the rules): ``publish`` waits until there is room. A slow consumer
  slows the producers down; nothing is dropped. The time publishers spent waiting is counted.
* ``drop_oldest`` (for viewers like ``tail`` or a browser): the oldest queued batch is discarded and counted, so a
  stuck viewer can never hold back the store. The drop is visible in ``stats``, never silent.

Closing the bus lets every subscriber drain what is queued and then end its ``async for``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from gateway.model import Sample

Batch = list[Sample]
Policy = Literal["block", "drop_oldest"]


@dataclass(slots=True)
class SubscriberStats:
    delivered_batches: int = 0
    delivered_samples: int = 0
    dropped_batches: int = 0
    dropped_samples: int = 0
    blocked_seconds: float = 0.0


class BusClosed(Exception):
    """Publishing on a closed bus."""


class Subscription:
    """A bounded queue of batches for one consumer; iterate it with ``async for batch in sub``."""

    def __init__(self, name: str, maxsize: int, policy: Policy) -> None:
        if maxsize < 1:
            raise ValueError("subscription queue size must be at least 1")
        self.name = name
        self.maxsize = maxsize
        self.policy = policy
        self.stats = SubscriberStats()
        self._queue: deque[Batch] = deque()
        self._not_empty = asyncio.Event()
        self._not_full = asyncio.Event()
        self._not_full.set()
        self._closed = False

    def depth(self) -> int:
        return len(self._queue)

    async def put(self, batch: Batch) -> None:
        if self.policy == "block":
            if len(self._queue) >= self.maxsize:
                started = time.monotonic()
                while len(self._queue) >= self.maxsize and not self._closed:
                    self._not_full.clear()
                    await self._not_full.wait()
                self.stats.blocked_seconds += time.monotonic() - started
        elif len(self._queue) >= self.maxsize:
            dropped = self._queue.popleft()
            self.stats.dropped_batches += 1
            self.stats.dropped_samples += len(dropped)
        self._queue.append(batch)
        self._not_empty.set()

    def take_queued(self, max_samples: int) -> list[Batch]:
        """The batches already waiting, oldest first, without waiting for more: as many as fit in ``max_samples``
        (counting the ones the caller holds is the caller's job), so a consumer that is slower than its producers
        (the outbox, one transaction at a time) takes what queued meanwhile in one go."""
        queue = self._queue
        taken: list[Batch] = []
        budget = max_samples
        while queue and len(queue[0]) <= budget:
            batch = queue.popleft()
            budget -= len(batch)
            taken.append(batch)
        if taken:
            self._not_full.set()
            self.stats.delivered_batches += len(taken)
            self.stats.delivered_samples += max_samples - budget
        return taken

    def close(self) -> None:
        self._closed = True
        self._not_empty.set()
        self._not_full.set()

    def __aiter__(self) -> AsyncIterator[Batch]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Batch]:
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._not_empty.clear()
                await self._not_empty.wait()
            batch = self._queue.popleft()
            self._not_full.set()
            self.stats.delivered_batches += 1
            self.stats.delivered_samples += len(batch)
            yield batch


class Bus:
    """Fan-out of sample batches. ``taps`` are synchronous callbacks run inline (the live cache): keep them O(batch)."""

    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._taps: list[Callable[[Batch], None]] = []
        self._closed = False
        self.published_batches = 0
        self.published_samples = 0

    def subscribe(self, name: str, *, maxsize: int = 256, policy: Policy = "block") -> Subscription:
        sub = Subscription(name, maxsize, policy)
        if self._closed:
            sub.close()
        self._subs.append(sub)
        return sub

    def tap(self, callback: Callable[[Batch], None]) -> None:
        self._taps.append(callback)

    async def publish(self, batch: Batch, *, skip: Subscription | None = None) -> None:
        """Deliver ``batch`` to every subscriber (but ``skip``), waiting where a blocking queue is full."""
        if self._closed:
            raise BusClosed("the bus is closed: the gateway is stopping")
        if not batch:
            return
        self.published_batches += 1
        self.published_samples += len(batch)
        for tap in self._taps:
            tap(batch)
        for sub in self._subs:
            if sub is not skip:
                await sub.put(batch)

    def subscriptions(self) -> list[Subscription]:
        return list(self._subs)

    def close(self) -> None:
        """No more publishing; subscribers drain what is queued, then their iteration ends."""
        self._closed = True
        for sub in self._subs:
            sub.close()

    @property
    def closed(self) -> bool:
        return self._closed
