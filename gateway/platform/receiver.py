"""The platform receiver's loop: batches from a broker, telemetry to the TSDB, progress committed, then acks.

Owns the order that makes a kill harmless (write to the TSDB, commit progress, ack), the TSDB writer (InfluxDB v2
``/api/v2/write``, millisecond precision, so a rewrite of the same message is the same point), the gateways' public
keys, and logging once per gateway and episode of bad input. The brokers are in ``sources`` (MQTT shared
subscriptions, NATS JetStream durable consumers); what a message means is in ``messages``; the database in
``progress``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.incentives.record import load_public_key
from gateway.platform.messages import Parsed, Rejected, parse
from gateway.platform.progress import BatchResult, Progress

log = logging.getLogger("gateway.platform")


class Delivery(Protocol):
    topic: str
    payload: bytes


class Source(Protocol):
    """A broker consumer: batches of deliveries; ``ack`` confirms a batch once it is committed."""

    def batches(self, stopping: asyncio.Event) -> AsyncIterator[Sequence[Delivery]]: ...

    async def ack(self, batch: Sequence[Delivery]) -> None: ...


class TsdbError(Exception):
    """The TSDB refused or could not be reached; the batch is retried, nothing is acked."""


class InfluxWriter:
    """InfluxDB v2 write API (InfluxDB 2.x, VictoriaMetrics, ...): line protocol, ``precision=ms``."""

    def __init__(self, *, url: str, org: str = "", bucket: str = "platform", token: str | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"TSDB url {url!r} must start with http:// or https://")
        self.url = url.rstrip("/") + "/api/v2/write"
        self.params = {"org": org, "bucket": bucket, "precision": "ms"}
        self.headers = {"Content-Type": "text/plain; charset=utf-8"}
        if token:
            self.headers["Authorization"] = f"Token {token}"
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> InfluxWriter:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def write(self, lines: list[str]) -> None:
        if not lines:
            return
        assert self._session is not None, "use InfluxWriter as an async context manager"
        try:
            async with self._session.post(
                self.url, params=self.params, headers=self.headers, data="\n".join(lines).encode()
            ) as response:
                if response.status >= 300:
                    text = (await response.text())[:300]
                    raise TsdbError(f"TSDB answered {response.status}: {text}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TsdbError(f"TSDB unreachable: {exc}") from exc


class PublicKeys:
    """``<dir>/<site>/<gateway>.pub.pem`` (as ``edge-gateway keys generate`` writes it), loaded once each."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._cache: dict[str, Ed25519PublicKey | None] = {}

    def __call__(self, gateway: str) -> Ed25519PublicKey | None:
        if gateway not in self._cache:
            site, _, name = gateway.partition("/")
            path = self.directory / site / f"{name}.pub.pem"
            try:
                self._cache[gateway] = load_public_key(path)
            except (OSError, ValueError) as exc:
                log.warning("platform: no usable public key for %s at %s: %s", gateway, path, exc)
                self._cache[gateway] = None
        return self._cache[gateway]


@dataclass
class _Episodes:
    """Bad input is logged once per gateway and problem class until that gateway sends good input again."""

    open: dict[tuple[str, str], int]

    def note(self, result: BatchResult) -> None:
        for gateway, problem, reason in result.rejected:
            key = (gateway, problem)
            if key not in self.open:
                log.warning("platform: %s: %s (quarantined; logged once until it sends good input)", gateway, reason)
                self.open[key] = 0
            self.open[key] += 1
        for key in [k for k in self.open if k[0] in result.good]:
            count = self.open.pop(key)
            log.info("platform: %s: good input again after %d quarantined message(s) (%s)", key[0], count, key[1])


class Receiver:
    def __init__(self, *, source: Source, tsdb: InfluxWriter, progress: Progress, prefix: str = "city") -> None:
        self.source = source
        self.tsdb = tsdb
        self.progress = progress
        self.prefix = prefix
        self.episodes = _Episodes({})
        self.batches = 0
        self.messages = 0
        #: seconds spent handling batches (parse, TSDB write, commit, ack), for capacity figures
        self.busy = 0.0

    async def run(self, stopping: asyncio.Event, *, retry_min: float = 0.2, retry_max: float = 10.0) -> None:
        async for batch in self.source.batches(stopping):
            await self.handle(batch, stopping, retry_min=retry_min, retry_max=retry_max)
            if stopping.is_set():
                return

    async def handle(
        self, batch: Sequence[Delivery], stopping: asyncio.Event, *, retry_min: float = 0.2, retry_max: float = 10.0
    ) -> BatchResult | None:
        started = time.perf_counter()
        items: list[tuple[Parsed | Rejected, bytes]] = [
            (parse(d.topic, d.payload, prefix=self.prefix), d.payload) for d in batch
        ]
        fresh = self.progress.unseen(p for p, _ in items if isinstance(p, Parsed) and p.kind == "telemetry")
        lines = [line for message in fresh for line in message.lines]
        delay = retry_min
        failing = False
        while True:
            try:
                await self.tsdb.write(lines)
                break
            except TsdbError as exc:
                if not failing:
                    log.warning("platform: %s; retrying, nothing acknowledged meanwhile", exc)
                    failing = True
                if stopping.is_set():
                    return None  # unacked: the broker delivers the batch again
                await asyncio.sleep(delay)
                delay = min(delay * 2, retry_max)
        if failing:
            log.info("platform: the TSDB takes writes again")
        result = await asyncio.to_thread(self.progress.commit, items)
        self.episodes.note(result)
        await self.source.ack(batch)
        self.batches += 1
        self.messages += len(batch)
        self.busy += time.perf_counter() - started
        return result


def summary(progress: Progress) -> dict[str, Any]:
    report = progress.report()
    report["latency_p99_ms_bucket"] = progress.latency_percentile(0.99)
    return report
