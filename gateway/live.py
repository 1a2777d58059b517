"""The live cache: the latest sample of every point plus a short history, for the status page, /api and ``tail``.

Owns only in-memory state, updated inline from the bus (a tap): O(batch), no allocation beyond the ring buffers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from gateway.model import Sample


class LiveCache:
    def __init__(self, *, history: int = 300) -> None:
        self.history_len = history
        self.latest: dict[str, Sample] = {}
        self.history: dict[str, deque[tuple[int, float]]] = {}
        self.updates = 0

    def update(self, batch: Sequence[Sample]) -> None:
        latest = self.latest
        history = self.history
        for sample in batch:
            latest[sample.point] = sample
            value = sample.value
            # only numbers are plotted; booleans plot as 0/1
            if value is not None and not isinstance(value, str):
                ring = history.get(sample.point)
                if ring is None:
                    ring = history[sample.point] = deque(maxlen=self.history_len)
                ring.append((sample.ts, float(value)))
        self.updates += len(batch)

    def get(self, point: str) -> Sample | None:
        return self.latest.get(point)

    def values(self) -> dict[str, object]:
        """point -> latest value (None when BAD): what rule tests and `tail` show."""
        return {point: sample.value for point, sample in self.latest.items()}
