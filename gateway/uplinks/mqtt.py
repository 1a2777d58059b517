"""``MqttUplink``: the city-platform MQTT client (aiomqtt): birth and death, retained meta, telemetry, events,
rule publications, and platform commands in.

Owns the platform connection and the one translation of MQTT errors into ``UplinkError``. Payloads and topics are
built by ``gateway.uplinks.contract``; commands are handed, as bytes, to ``gateway.commands_platform``. The only
gateway module importing ``aiomqtt`` (sensor-side MQTT lives in ``drivers/mqtt``).

Delivery: every message is QoS 1 (``qos: 0`` only for telemetry, if configured), and ``send`` returns when the
broker has acknowledged all of the batch's messages, so the runner acks the outbox only over what the broker holds.
At most ``max_inflight_messages`` are unacknowledged at once: paho's delivery collapses with tens of thousands
outstanding (FIELD-NOTES.md).

A lost connection fails every publish in flight at once (``send`` raises a retryable ``UplinkError``): the messages
were not acknowledged, so the runner sends them again from the outbox after the reconnection, with the same seq and
ids. Without this, each would wait for its delivery timeout on a client that is already gone.

The Last Will is composed when the connection opens and sent by the broker unchanged, so its only time is the
connection's start (``since``, see ``contract.will_payload``); the time of death is when the platform receives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import aiomqtt

from gateway import __version__
from gateway.errors import UplinkError, leaf_exceptions
from gateway.uplinks import contract
from gateway.uplinks.base import StreamKind, UplinkBatch
from gateway.uplinks.config import PlatformConfig

if TYPE_CHECKING:
    from gateway.config.site import Site

log = logging.getLogger(__name__)

CommandCallback = Callable[[str, bytes], Awaitable[None]]

#: calls outside the publish window (birth, meta, subscribe, goodbye) that may be pending besides it
_PENDING_HEADROOM = 16


def tls_context(config: PlatformConfig) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    tls = config.tls
    context = ssl.create_default_context(cafile=str(tls.ca) if tls.ca is not None else None)
    if tls.cert is not None and tls.key is not None:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class MqttUplink:
    kinds: frozenset[StreamKind] = frozenset({"telemetry", "events"})

    def __init__(
        self,
        config: PlatformConfig,
        *,
        site: Site,
        on_command: CommandCallback | None = None,
        before_commands: Callable[[], Awaitable[None]] | None = None,
        on_close: Callable[[], None] | None = None,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
    ) -> None:
        self.config = config
        self.site = site
        gateway = site.config.gateway
        self.base = contract.base_topic(config.prefix, gateway.site, gateway.id)
        #: personal points never go out raw (gateway.uplinks.contract)
        self.shared = contract.PlatformPoints(site.registry)
        self.client_id = config.client_id or f"edge-gateway-{gateway.site}-{gateway.id}"
        self.on_command = on_command if config.commands else None
        #: awaited on each connection before the command subscription (answers what a crash left unanswered)
        self.before_commands = before_commands
        self.on_close = on_close
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self._client: aiomqtt.Client | None = None
        self._window = asyncio.Semaphore(config.max_inflight_messages)
        #: set when the current connection ends: publishes in flight on it fail at once (a new one per connection)
        self._lost = asyncio.Event()
        self.connected = asyncio.Event()
        #: set by the runner: called on every (re)connection
        self.on_connected: Callable[[], None] | None = None
        self._lost_since: float | None = None
        self._reconnect_delay = reconnect_min
        self.published = 0
        self.commands_received = 0

    # -- connection ---------------------------------------------------------------------------------------------

    def _make_client(self) -> aiomqtt.Client:
        password = self.config.password.reveal() if self.config.password is not None else None
        will = aiomqtt.Will(
            f"{self.base}/status",
            contract.will_payload(connected_ms=_now_ms(), version=__version__),
            qos=1,
            retain=True,
        )
        client = aiomqtt.Client(
            self.config.host,
            port=self.config.effective_port,
            identifier=self.client_id,
            username=self.config.username,
            password=password,
            will=will,
            keepalive=int(self.config.keepalive),
            tls_context=tls_context(self.config),
            max_inflight_messages=self.config.max_inflight_messages,
            timeout=self.config.delivery.timeout,
        )
        # aiomqtt warns on every call while more than 10 are pending (166 lines in one broker bounce); the window
        # bounds what is pending, so warn only if that bound is ever broken
        client.pending_calls_threshold = self.config.max_inflight_messages + _PENDING_HEADROOM
        return client

    async def maintain(self, closing: asyncio.Event) -> None:
        """Connect, announce (status online, meta), listen for commands; reconnect with backoff until closing."""
        self._reconnect_delay = self.reconnect_min
        while not closing.is_set():
            try:
                async with asyncio.TaskGroup() as tg:
                    session = tg.create_task(self._session(closing), name="uplink[platform].session")
                    # A connect that hangs (a TLS handshake the broker never finishes) must not delay a stop.
                    watcher = tg.create_task(self._abandon_on_close(closing), name="uplink[platform].stop-watch")
                    await asyncio.wait({session, watcher}, return_when=asyncio.FIRST_COMPLETED)
                    if session.done():
                        watcher.cancel()
                    else:
                        session.cancel()
            except* (aiomqtt.MqttError, OSError, ssl.SSLError) as group:
                if self._lost_since is None:
                    self._lost_since = time.monotonic()
                    log.warning(
                        "platform broker %s:%d unavailable: %s; reconnecting with backoff",
                        self.config.host,
                        self.config.effective_port,
                        group.exceptions[0],
                    )
            finally:
                self._client = None
                self.connected.clear()
            if closing.is_set():
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._reconnect_delay):
                    await closing.wait()
            self._reconnect_delay = min(self.reconnect_max, self._reconnect_delay * 2)

    async def _abandon_on_close(self, closing: asyncio.Event) -> None:
        """Return when closing is set before a connection exists; while connected, the session says goodbye."""
        await closing.wait()
        if self.connected.is_set():
            await asyncio.Event().wait()  # connected: the session ends itself, with its goodbye, and cancels this

    async def _session(self, closing: asyncio.Event) -> None:
        """One connection, from connect to goodbye (closing) or loss (raises)."""
        async with self._make_client() as client:
            await self._announce(client)
            lost = self._lost = asyncio.Event()
            self._client = client
            self.connected.set()
            self._reconnect_delay = self.reconnect_min
            if self.on_connected is not None:
                self.on_connected()
            if self._lost_since is not None:
                log.info(
                    "platform broker %s reachable again after %.1fs",
                    self.config.host,
                    time.monotonic() - self._lost_since,
                )
                self._lost_since = None
            else:
                log.info(
                    "connected to platform broker %s:%d as %s",
                    self.config.host,
                    self.config.effective_port,
                    self.client_id,
                )
            try:
                await self._serve(client, closing)
            finally:
                lost.set()  # first, before the client is closed: sends in flight give up now
            await self._say_goodbye(client)

    async def _announce(self, client: aiomqtt.Client) -> None:
        gateway = self.site.config.gateway
        online = contract.status_payload("online", reason="connected", ts_ms=_now_ms(), version=__version__)
        meta = contract.meta_payload(
            site=gateway.site, gateway=gateway.id, name=gateway.name, registry=self.site.registry, ts_ms=_now_ms()
        )
        await client.publish(f"{self.base}/status", online, qos=1, retain=True)
        await client.publish(f"{self.base}/meta", meta, qos=1, retain=True)
        if self.on_command is not None:
            if self.before_commands is not None:
                try:
                    await self.before_commands()
                except Exception:
                    # e.g. the outbox refusing a recovered result (full disk): commands are still taken; the
                    # recovery is tried again before the next one
                    log.exception("platform commands: answering what a restart left unanswered failed")
            await client.subscribe(f"{self.base}/cmd/#", qos=1)

    async def _serve(self, client: aiomqtt.Client, closing: asyncio.Event) -> None:
        """Handle commands until the connection drops (raises MqttError) or ``closing`` is set."""
        async with asyncio.TaskGroup() as tg:
            listener = tg.create_task(self._listen(client), name="uplink[platform].commands")
            await closing.wait()
            listener.cancel()

    async def _listen(self, client: aiomqtt.Client) -> None:
        prefix = f"{self.base}/cmd/"
        async for message in client.messages:
            topic = message.topic.value
            if self.on_command is None or not topic.startswith(prefix):
                continue
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            self.commands_received += 1
            try:
                await self.on_command(topic[len(prefix) :], payload)
            except Exception:
                # e.g. the outbox refusing the command's result (full disk): the connection and the delivery of
                # everything else must go on; the platform sees no result and retries with the same command id
                log.exception("platform command on %s could not be handled", topic)

    async def _say_goodbye(self, client: aiomqtt.Client) -> None:
        offline = contract.status_payload("offline", reason="stopped", ts_ms=_now_ms(), version=__version__)
        try:
            await client.publish(f"{self.base}/status", offline, qos=1, retain=True, timeout=2.0)
        except aiomqtt.MqttError as exc:
            log.warning("could not publish offline status on stop: %s", exc)

    async def close(self) -> None:
        """The connection is owned by ``maintain``, which ends it; the command side (its journal) is released."""
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            on_close()

    # -- delivery -----------------------------------------------------------------------------------------------

    async def send(self, batch: UplinkBatch) -> None:
        client, lost = self._client, self._lost
        if client is None or lost.is_set():
            raise UplinkError(f"not connected to platform broker {self.config.host}", retryable=True)
        if batch.kind == "telemetry":
            messages: Iterable[tuple[str, bytes, bool]] = (
                (topic, payload, False)
                for topic, payload in contract.telemetry_messages(
                    self.base, batch.telemetry, historical=batch.historical, shared=self.shared
                )
            )
            qos = self.config.qos
        else:
            checked: list[tuple[str, bytes, bool]] = []
            for stored in batch.events:
                if stored.event.type == "publish":
                    problem = contract.publish_topic_problem(stored.event.subject)
                    if problem is not None:
                        raise UplinkError(f"event {stored.event.id}: {problem}", retryable=False)
                topic, payload = contract.event_message(self.base, stored)
                checked.append((topic, payload, stored.event.type in contract.RETAINED_EVENT_TYPES))
            messages = checked
            qos = 1  # events are never fire-and-forget
        try:
            async with asyncio.TaskGroup() as tg:
                # the connection's end fails the batch at once: the group cancels every publish still waiting
                watcher = tg.create_task(_fail_when_lost(lost), name="uplink[platform].send-watch")
                publishes: list[asyncio.Task[None]] = []
                for topic, payload, retain in messages:
                    await self._window.acquire()
                    task = tg.create_task(self._publish(client, topic, payload, qos, retain))
                    # released on completion, including a task cancelled before it ever ran (a sibling failed):
                    # a release in the coroutine's own `finally` would leak the slot then, and the window with it
                    task.add_done_callback(lambda _t: self._window.release())
                    publishes.append(task)
                if publishes:
                    await asyncio.wait(publishes)
                watcher.cancel()
        except BaseExceptionGroup as group:
            # a plain handler, not except*: an exception raised inside except* reaches the runner still wrapped in an
            # ExceptionGroup on Python before 3.11.4 (Debian 12's 3.11.2), and the runner would not see UplinkError
            broker = next((e for e in leaf_exceptions(group) if isinstance(e, aiomqtt.MqttError)), None)
            if broker is None:
                raise
            raise UplinkError(f"platform broker: {broker}", retryable=True) from None

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        await client.publish(topic, payload, qos=qos, retain=retain)
        self.published += 1


async def _fail_when_lost(lost: asyncio.Event) -> None:
    await lost.wait()
    raise aiomqtt.MqttError("connection lost with publishes in flight")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
