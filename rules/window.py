"""Sliding-window aggregates over recent samples of one point: avg, min, max, sum, count, integrate, rate.

Owns ``Window``. Aggregates are over samples (like Prometheus ``avg_over_time``), not time-weighted, except
``integrate`` (trapezoids between consecutive samples) and ``rate`` (first to last sample). Each sample is added
once and evicted once; min/max use monotonic deques, so every update is O(1) amortised. Imports nothing from the
runtime.
"""

from __future__ import annotations

from collections import deque

#: a window never holds more samples than this (a 1-day window at 10 Hz would be 864k floats per point)
MAX_WINDOW_SAMPLES = 100_000


class Window:
    """Samples of one point within the last ``span_ns``; ``value()`` is the aggregate or None when undefined."""

    __slots__ = (
        "_added",
        "_area",
        "_evicted",
        "_maxq",
        "_minq",
        "_samples",
        "_sum",
        "function",
        "per_s",
        "span_ns",
    )

    def __init__(self, function: str, span_ns: int, per_s: float = 1.0) -> None:
        self.function = function
        self.span_ns = span_ns
        self.per_s = per_s
        self._samples: deque[tuple[int, float]] = deque()
        self._minq: deque[tuple[int, float]] = deque()
        self._maxq: deque[tuple[int, float]] = deque()
        self._sum = 0.0
        self._area = 0.0  # trapezoid area (value x seconds) between consecutive samples in the window
        # min/max deques hold (sequence number, value): timestamps may repeat, sequence numbers never do
        self._added = 0
        self._evicted = 0

    def same_definition(self, other: Window) -> bool:
        return (self.function, self.span_ns, self.per_s) == (other.function, other.span_ns, other.per_s)

    def add(self, ts_ns: int, value: float) -> None:
        samples = self._samples
        if samples and ts_ns < samples[-1][0]:
            return  # out of order: a late sample would corrupt the running figures; windows move forward only
        if samples:
            last_ts, last_value = samples[-1]
            self._area += (last_value + value) / 2 * (ts_ns - last_ts) / 1e9
        samples.append((ts_ns, value))
        self._sum += value
        seq = self._added
        self._added = seq + 1
        minq = self._minq
        while minq and minq[-1][1] >= value:
            minq.pop()
        minq.append((seq, value))
        maxq = self._maxq
        while maxq and maxq[-1][1] <= value:
            maxq.pop()
        maxq.append((seq, value))
        if len(samples) > MAX_WINDOW_SAMPLES:
            self._evict_first()

    def _evict_first(self) -> None:
        ts, value = self._samples.popleft()
        self._sum -= value
        if self._samples:
            next_ts, next_value = self._samples[0]
            self._area -= (value + next_value) / 2 * (next_ts - ts) / 1e9
        else:
            self._sum = 0.0  # forget accumulated float error whenever the window empties
            self._area = 0.0
        seq = self._evicted
        self._evicted = seq + 1
        if self._minq and self._minq[0][0] == seq:
            self._minq.popleft()
        if self._maxq and self._maxq[0][0] == seq:
            self._maxq.popleft()

    def expire(self, now_ns: int) -> bool:
        """Drop samples older than the window; True when anything was dropped."""
        horizon = now_ns - self.span_ns
        samples = self._samples
        dropped = False
        while samples and samples[0][0] <= horizon:
            self._evict_first()
            dropped = True
        return dropped

    def __len__(self) -> int:
        return len(self._samples)

    def value(self) -> float | int | None:
        samples = self._samples
        if not samples:
            return None if self.function != "count" else 0
        function = self.function
        if function == "avg":
            return self._sum / len(samples)
        if function == "sum":
            return self._sum
        if function == "count":
            return len(samples)
        if function == "min":
            return self._minq[0][1]
        if function == "max":
            return self._maxq[0][1]
        if function == "integrate":
            return self._area / self.per_s
        if function == "rate":
            if len(samples) < 2:
                return None
            (t0, v0), (t1, v1) = samples[0], samples[-1]
            if t1 == t0:
                return None
            return (v1 - v0) / ((t1 - t0) / 1e9) * self.per_s
        raise AssertionError(f"unknown aggregate {function}")
