"""What an uplink is: the batch it is handed, the protocol it implements, the clock the runner paces it by.

Owns ``UplinkBatch``, the ``Uplink`` protocol and ``Clock``. Imports no protocol library and nothing from the
runner: an uplink (``InfluxUplink``, ``MqttUplink``) implements ``send`` and its connection, and nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, runtime_checkable

from gateway.model import Sample
from gateway.outbox import StoredEvent, TelemetryBatch

StreamKind = Literal["telemetry", "events"]


@dataclass(frozen=True, slots=True)
class UplinkBatch:
    """Records for one request. ``historical`` marks backfill: data replayed after an outage, behind live data.

    Either ``telemetry`` or ``events`` is filled, never both. Sequence numbers are the outbox's, so a resend after
    a crash carries the same numbers (the far side's deduplication key, with the ids of the events).
    """

    kind: StreamKind
    historical: bool = False
    telemetry: list[TelemetryBatch] = field(default_factory=list)
    events: list[StoredEvent] = field(default_factory=list)

    @property
    def first_seq(self) -> int:
        return self.telemetry[0].seq if self.kind == "telemetry" else self.events[0].seq

    @property
    def last_seq(self) -> int:
        return self.telemetry[-1].seq if self.kind == "telemetry" else self.events[-1].seq

    @property
    def size(self) -> int:
        """Samples (telemetry) or events in the batch."""
        if self.kind == "telemetry":
            return sum(len(b.samples) for b in self.telemetry)
        return len(self.events)

    def samples(self) -> Iterator[Sample]:
        for stored in self.telemetry:
            yield from stored.samples

    def split(self) -> tuple[UplinkBatch, UplinkBatch] | None:
        """Two halves of this batch (for isolating a record the far side refuses), or None for a single record."""
        if self.kind == "events":
            if len(self.events) < 2:
                return None
            half = len(self.events) // 2
            return replace(self, events=self.events[:half]), replace(self, events=self.events[half:])
        if len(self.telemetry) >= 2:
            half = len(self.telemetry) // 2
            return replace(self, telemetry=self.telemetry[:half]), replace(self, telemetry=self.telemetry[half:])
        only = self.telemetry[0]
        if len(only.samples) < 2:
            return None
        half = len(only.samples) // 2
        first = TelemetryBatch(only.seq, only.created_ns, only.samples[:half])
        second = TelemetryBatch(only.seq, only.created_ns, only.samples[half:])
        return replace(self, telemetry=[first]), replace(self, telemetry=[second])

    def describe(self) -> str:
        """A short human description of the records (for the quarantine log line)."""
        if self.kind == "events":
            return ", ".join(f"event {s.event.id} ({s.event.type})" for s in self.events)
        return ", ".join(f"{s.point}={s.value!r} @ {s.ts}" for s in self.samples())


class Uplink(Protocol):
    """One far side. ``send`` raises ``UplinkError(retryable=...)``; it never retries or sleeps on its own.

    ``maintain(closing)`` keeps the connection (MQTT: connect, birth message, command subscription, reconnect) until
    ``closing`` is set, then says goodbye; an uplink with nothing to maintain returns at once.
    """

    #: which outbox streams this uplink delivers
    kinds: frozenset[StreamKind]

    async def send(self, batch: UplinkBatch) -> None: ...

    async def maintain(self, closing: asyncio.Event) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class ConnectionAware(Protocol):
    """An uplink with a lasting connection tells the runner when it is back, so a retry waiting out its backoff
    starts at once instead of up to ``retry_max`` later."""

    on_connected: Callable[[], None] | None
