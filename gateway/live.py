"""The live cache: the latest sample of every point plus a short history, for the status page, /api and ``tail``.

Owns only in-memory state, updated inline from the bus (a tap): O(batch), no allocation per sample once a point's
ring exists.

Memory is the point of this module's shape. The history of a point is a ring of two typed arrays (``array('q')``
for the nanosecond timestamps, ``array('d')`` for the values) and a write index: 16 bytes a value, where a
``deque`` of ``(int, float)`` tuples cost about 130 (about 189 MiB for 5,000 points x 300 values; bench/memory.py).
The ring is only as deep as the status page's sparklines show (``history``, default 300: five minutes at a 1 s
poll). History is kept only while someone watches: it begins with the first reader (the views reading live values
call ``watched()``; a new cache keeps none, so a gateway whose page is never opened never builds a ring), and after
``unwatched_after`` seconds (default 10 minutes) without a reader the rings are dropped, to be rebuilt from the next
reading on when someone looks again (until then the page draws its sparklines from live values). A gateway whose
status page is off keeps no history at all (``history=0``, or ``stop_history()``, which the supervisor calls when
it starts without the HTTP server).

Dropped rings go back to the OS, not only to the allocator: glibc keeps freed heap pages mapped (RSS stays at the
high-water mark, about 24 MiB of rings for 5,000 points), so each drop asks it once to release them
(``malloc_trim(0)``, where the C library has it; bench/live_trim.py shows the difference).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from functools import cache

from gateway.model import Sample

#: the status page's sparkline window (static/status.js WINDOW_MS) at a 1 s poll
DEFAULT_HISTORY = 300
#: seconds without a reader (status page, /api, ``tail``) after which the history is dropped until the next one
UNWATCHED_AFTER = 600.0


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows) or ctypes is missing."""
    try:
        import ctypes  # only when history is first dropped: an idle gateway never imports it

        trim = ctypes.CDLL(None).malloc_trim  # the C library the interpreter itself runs on
    except (ImportError, OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_heap() -> None:
    """Return the free pages of the C heap to the OS (glibc only; elsewhere nothing happens)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)  # 0: keep no padding at the top of the heap


class HistoryRing:
    """The last ``depth`` numeric values of one point, oldest first when iterated as ``(ts_ns, value)``."""

    __slots__ = ("_next", "_ts", "_values", "depth")

    def __init__(self, depth: int) -> None:
        self.depth = depth
        # grown by append until full, then overwritten in place: a point seen once costs one slot, not ``depth``
        self._ts = array("q")
        self._values = array("d")
        self._next = 0  # where the next value goes once the ring is full (the oldest value)

    def append(self, ts: int, value: float) -> None:
        ts_ring = self._ts
        if len(ts_ring) < self.depth:
            ts_ring.append(ts)
            self._values.append(value)
            return
        i = self._next
        ts_ring[i] = ts
        self._values[i] = value
        i += 1
        self._next = 0 if i == self.depth else i

    def __len__(self) -> int:
        return len(self._ts)

    def __iter__(self) -> Iterator[tuple[int, float]]:
        start = self._next
        ts_ring, values = self._ts, self._values
        n = len(ts_ring)
        for k in range(n):
            i = (start + k) % n
            yield ts_ring[i], values[i]

    def nbytes(self) -> int:
        """Bytes held by the two arrays' buffers (what bench/memory.py reports besides tracemalloc)."""
        return self._ts.buffer_info()[1] * self._ts.itemsize + self._values.buffer_info()[1] * self._values.itemsize


class LiveCache:
    """``latest``: point -> newest Sample; ``history``: point -> ``HistoryRing`` (numbers only, booleans as 0/1).

    ``history`` is the depth of each ring once someone watches; 0 keeps no history (the status page is off, nobody
    can read it). ``history_len`` is the depth in force: 0 until the first ``watched()`` and while unwatched.
    ``unwatched_after``: seconds without a ``watched()`` call after which the history is dropped (``clock`` is
    ``time.monotonic``; tests pass a fake one). ``release``: called once each time rings are dropped, to hand the
    freed memory back to the OS (``release_freed_heap``)."""

    def __init__(
        self,
        *,
        history: int = DEFAULT_HISTORY,
        unwatched_after: float = UNWATCHED_AFTER,
        clock: Callable[[], float] = time.monotonic,
        release: Callable[[], None] = release_freed_heap,
    ) -> None:
        if history < 0:
            raise ValueError(f"history must be 0 (none) or a positive number of values, not {history}")
        # nobody has looked yet: no rings until the first reader (5,000 points x 300 values is 24 MiB for nothing)
        self.history_len = 0
        self.latest: dict[str, Sample] = {}
        self.history: dict[str, HistoryRing] = {}
        self.updates = 0
        self.unwatched_after = unwatched_after
        self._clock = clock
        self._release = release
        self._depth = history  # what history_len becomes when someone watches
        self._last_read = clock()

    def stop_history(self) -> None:
        """Keep no more history, and free what is kept: called when nothing can read it (status page off)."""
        self.history_len = self._depth = 0
        self._drop_history()

    def watched(self) -> None:
        """A reader looked (status page, /api, ``tail``): keep, or start, the history."""
        self._last_read = self._clock()
        self.history_len = self._depth

    def _drop_history(self) -> None:
        dropped, self.history = self.history, {}
        if dropped:
            del dropped  # its last reference (snapshots copy the rings): freed here, before the heap is trimmed
            self._release()

    def update(self, batch: Sequence[Sample]) -> None:
        latest = self.latest
        depth = self.history_len
        if depth and self._clock() - self._last_read > self.unwatched_after:
            depth = self.history_len = 0  # nobody looked for a while: free the rings until someone does
            self._drop_history()
        if depth == 0:
            for sample in batch:
                latest[sample.point] = sample
            self.updates += len(batch)
            return
        history = self.history
        for sample in batch:
            point = sample.point
            latest[point] = sample
            value = sample.value
            # only numbers are plotted; booleans plot as 0/1
            if value is not None and not isinstance(value, str):
                ring = history.get(point)
                if ring is None:
                    ring = history[point] = HistoryRing(depth)
                ring.append(sample.ts, float(value))
        self.updates += len(batch)

    def get(self, point: str) -> Sample | None:
        return self.latest.get(point)

    def values(self) -> dict[str, object]:
        """point -> latest value (None when BAD): what rule tests and `tail` show."""
        return {point: sample.value for point, sample in self.latest.items()}
