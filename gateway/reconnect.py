"""One reconnect policy for every connection the gateway keeps: backoff with jitter, reset on proven success.

Owns ``ReconnectPolicy``. DESIGN.md ("Extension seams") asks for one policy serving every driver and uplink; this
module is it. The drivers use it for their links and for each slave's (or device's) breaker, the uplink runner and
the platform uplink for their connections, and the supervisor to restart a source that crashed.

How it behaves, and why:

* the first retry comes fast (``first``, a fraction of a second): most outages in a building are short (a device
  rebooting, a switch port flapping), and an operator expects readings back about a second after the device is;
* each further failure multiplies the delay by ``factor`` up to ``maximum``, so a device that stays away costs
  little; the delay is spread by +/- ``jitter`` so many gateways (or many slaves) that lost the same switch do not
  reconnect in lock-step;
* only proven success resets the delay: the caller says ``succeeded()`` after the first good exchange (a poll
  answered, a PUBACK), not when a TCP connect returned, because a peer that accepts connections and then answers
  nothing would otherwise be hammered at the first delay forever;
* it logs one line when an outage starts and one when it ends (with its length), never one per attempt.

It is pure: time comes from ``clock`` and randomness from ``random``, both injectable, and it never sleeps. The
caller waits ``failed()``'s answer its own way (an ``asyncio.Event`` wait that a write or a stop can cut short), so
tests drive it on a fake clock without real sleeps: the uplink runner and the supervisor wait through a ``Clock``
(``gateway/uplinks/base.py``) that tests replace, and take their ``RetryTiming`` as an argument. A connection loop
adopts it like this::

    policy = ReconnectPolicy("uplink[influx]", RetryTiming(first=0.5, maximum=30))
    while not stopping.is_set():
        try:
            async with connect() as conn:
                async for batch in work(conn):
                    await conn.send(batch)
                    policy.succeeded()          # proven: the far side accepted something
        except ConnectionError as exc:
            wait = policy.failed(f"send failed ({exc})")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=wait)

A per-peer breaker (skip a peer until its wait is over, without sleeping) uses ``allows(now)`` instead of sleeping,
as the Modbus driver does for each slave on a shared bus.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ReconnectPolicy", "RetryTiming"]


@dataclass(frozen=True, slots=True)
class RetryTiming:
    """The numbers of a policy, in seconds. ``first`` and ``maximum`` bound the delay before jitter."""

    first: float = 0.25
    maximum: float = 2.0
    factor: float = 2.0
    #: the delay is multiplied by a uniform draw in [1 - jitter, 1 + jitter]
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.maximum:
            raise ValueError(f"retry delays need 0 < first <= maximum (got first={self.first}, maximum={self.maximum})")
        if self.factor < 1:
            raise ValueError(f"the backoff factor must be at least 1, not {self.factor}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter is a fraction in [0, 1), not {self.jitter}")


class ReconnectPolicy:
    """The retry state of one connection (or one slave). Not thread-safe; one owner.

    ``failed(reason)`` records a failed attempt and returns how long to wait before the next one; ``allows(now)``
    says whether that wait is over; ``succeeded()`` records proven success and resets the delay.
    """

    __slots__ = ("_clock", "_delay", "_log", "_random", "attempts", "name", "outage_since", "retry_at", "timing")

    def __init__(
        self,
        name: str,
        timing: RetryTiming | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
        logger: logging.Logger | None = None,
    ) -> None:
        self.name = name
        self.timing = timing or RetryTiming()
        self._clock = clock
        self._random = random
        self._log = logger or logging.getLogger("gateway.reconnect")
        self._delay = self.timing.first
        #: when the current outage started (clock seconds), None while connected
        self.outage_since: float | None = None
        #: failed attempts in the current outage
        self.attempts = 0
        #: the clock time before which the next attempt should not be made
        self.retry_at = 0.0

    @property
    def down(self) -> bool:
        return self.outage_since is not None

    def allows(self, now: float | None = None) -> bool:
        """True when an attempt may be made now (no outage, or its wait is over)."""
        return (self._clock() if now is None else now) >= self.retry_at

    def failed(self, reason: str) -> float:
        """Record a failed attempt; return the seconds to wait before the next one. Logs the start of an outage."""
        now = self._clock()
        if self.outage_since is None:
            self.outage_since = now
            self._log.warning("%s: %s; retrying in the background", self.name, reason)
        self.attempts += 1
        timing = self.timing
        wait = self._delay * (1 - timing.jitter + 2 * timing.jitter * self._random())
        self._delay = min(self._delay * timing.factor, timing.maximum)
        self.retry_at = now + wait
        return wait

    def succeeded(self) -> float | None:
        """Record proven success; return the outage's length in seconds if this ends one (logged once)."""
        self._delay = self.timing.first
        self.retry_at = 0.0
        if self.outage_since is None:
            return None
        lasted = self._clock() - self.outage_since
        self._log.info("%s: back after %.1fs (%d failed attempts)", self.name, lasted, self.attempts)
        self.outage_since = None
        self.attempts = 0
        return lasted

    def next_delay_bounds(self) -> tuple[float, float]:
        """The range the next ``failed()`` will return (for status pages and tests)."""
        jitter = self.timing.jitter
        return self._delay * (1 - jitter), self._delay * (1 + jitter)


class Clock:
    """Wall and monotonic time plus waiting: what the supervisor and the uplink runners wait on. Tests pass a fake one
    so backoffs, lingers and grace periods run without sleeping."""

    def time_ns(self) -> int:
        return time.time_ns()

    def monotonic(self) -> float:
        return time.monotonic()

    async def wait(self, event: asyncio.Event, seconds: float) -> bool:
        """Wait for ``event`` at most ``seconds``; True if it was set."""
        if event.is_set():
            return True
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            return False
        return True
