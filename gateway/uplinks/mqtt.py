"""``MqttUplink``: the city-platform MQTT client (aiomqtt): birth and death, retained meta, telemetry, events,
rule publications, and platform commands in.

Owns the platform connection and the one translation of MQTT errors into ``UplinkError``. Payloads and topics are
built by ``gateway.uplinks.contract``; commands are handed, as bytes, to ``gateway.platform_commands``. The only
gateway module importing ``aiomqtt`` (sensor-side MQTT lives in ``drivers/mqtt``).

Delivery: every message is QoS 1 (``qos: 0`` only for telemetry, if configured), and ``send`` returns when the
broker has acknowledged all of the batch's messages, so the runner acks the outbox only over what the broker holds.

Publishes are pipelined: ``send`` hands each message to paho at once and counts the batch's message ids; paho's
``on_publish`` (PUBACK) counts them off, and one future per batch, not per message, wakes ``send`` when the count is
zero (``_PublishWindow``). aiomqtt's own ``publish`` awaited an event per message and, with many pending, scanned
them all on every call and logged ``There are N pending publish calls`` each time (issue 19: 13-17 lines a second).
At most ``max_inflight_messages`` are unacknowledged at once (paho's delivery collapses with tens of thousands
outstanding, FIELD-NOTES.md); a full window pauses ``send`` until the broker has acknowledged half of it, and the
episode is logged once when it starts and once when it ends (the window empty and no pause for
``CONGESTION_QUIET`` seconds, or the connection gone).

A lost connection fails every publish in flight at once (``send`` raises a retryable ``UplinkError``): the messages
were not acknowledged, so the runner sends them again from the outbox after the reconnection, with the same seq and
ids. Without this, each would wait for its delivery timeout on a client that is already gone.

Brokers: ``brokers:`` lists several (the nodes of a cluster); ``maintain`` connects to the rotation's current one
and moves to the next after a failed connect or a lost session (``gateway.mqtt_connection.BrokerRotation``: at once
until every broker has failed in a row, then with the shared backoff). The session is persistent on each broker.

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
from typing import TYPE_CHECKING, Any

import aiomqtt
import paho.mqtt.client as mqtt

from gateway import __version__
from gateway.errors import UplinkError
from gateway.mqtt_connection import tls_context
from gateway.reconnect import ReconnectPolicy, RetryTiming
from gateway.uplinks import contract
from gateway.uplinks.base import StreamKind, UplinkBatch
from gateway.uplinks.config import PlatformConfig

if TYPE_CHECKING:
    from gateway.config.site import Site

log = logging.getLogger(__name__)

CommandCallback = Callable[[str, bytes], Awaitable[None]]

#: calls outside the publish window (birth, meta, subscribe, goodbye) that may be pending besides it
_PENDING_HEADROOM = 16
#: a congestion episode ends when the window has stayed below its limit this long with nothing pending: a backlog
#: drained request by request empties the window between requests, and that is still one episode
CONGESTION_QUIET = 2.0


class _BatchAck:
    """The broker's acknowledgements still owed for one ``send``; ``done`` resolves when none are (or fails)."""

    __slots__ = ("done", "owed", "sealed")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.owed = 0
        self.sealed = False  # every message of the batch was handed to paho: the count can only go down now

    def acked(self) -> None:
        self.owed -= 1
        if self.owed == 0 and self.sealed and not self.done.done():
            self.done.set_result(None)

    def seal(self) -> None:
        self.sealed = True
        if self.owed == 0 and not self.done.done():
            self.done.set_result(None)


class _PublishWindow:
    """Messages published on one connection and not yet acknowledged, by paho message id (one per connection).

    Runs on the event loop's thread only: aiomqtt drives paho's reads and writes from loop callbacks, so PUBACKs
    (``acked``) and publishes never race. A message id paho reuses is never still pending here: the window is far
    below the 65,535 ids."""

    def __init__(self, limit: int, *, name: str) -> None:
        self.limit = limit
        self.name = name
        self._pending: dict[int, _BatchAck] = {}
        self._room = asyncio.Event()
        self._room.set()
        self._lost: BaseException | None = None
        self._congested_since: float | None = None
        self._last_pause = 0.0
        self._waits = 0
        self._end_timer: asyncio.TimerHandle | None = None
        self.acked_total = 0

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def congested(self) -> bool:
        return self._congested_since is not None

    def track(self, mid: int, ack: _BatchAck) -> None:
        if self._lost is not None:
            # never owed by a dead connection: its acknowledgement could not come, the batch would wait its timeout
            raise aiomqtt.MqttError(str(self._lost))
        self._pending[mid] = ack
        ack.owed += 1

    def acked(self, mid: int) -> None:
        """paho's ``on_publish``: the broker holds message ``mid`` (QoS 1), or it was written (QoS 0)."""
        ack = self._pending.pop(mid, None)
        if ack is None:
            return  # a message of aiomqtt's own (status, meta): not ours to count
        self.acked_total += 1
        ack.acked()
        pending = len(self._pending)
        if not self._room.is_set() and pending <= self.limit // 2:
            self._room.set()  # half drained: publish in bursts, not one message per PUBACK
        if pending == 0 and self._congested_since is not None and self._end_timer is None:
            self._end_timer = asyncio.get_running_loop().call_later(CONGESTION_QUIET, self._end_episode)

    def _end_episode(self) -> None:
        self._end_timer = None
        if self._congested_since is None:
            return
        log.info(
            "%s: publish window drained: the broker kept up again after %.1fs of congestion (%d pauses)",
            self.name,
            self._last_pause - self._congested_since,
            self._waits,
        )
        self._congested_since = None

    async def wait_for_room(self) -> None:
        """Return when another message may be published; raise the connection's loss if it ends meanwhile."""
        while len(self._pending) >= self.limit and self._lost is None:
            now = time.monotonic()
            if self._end_timer is not None:
                self._end_timer.cancel()  # the episode goes on
                self._end_timer = None
            if self._congested_since is None:
                # once per episode, not once per pause: it ends after CONGESTION_QUIET without a pause
                self._congested_since = now
                self._waits = 0
                log.warning(
                    "%s: %d messages unacknowledged by the broker (the window is full); publishing paused until "
                    "it catches up, data waits in the outbox",
                    self.name,
                    len(self._pending),
                )
            self._last_pause = now
            self._waits += 1
            self._room.clear()
            await self._room.wait()
        if self._lost is not None:
            raise aiomqtt.MqttError(str(self._lost))

    def fail_all(self, error: BaseException) -> None:
        """The connection ended: every batch still owed an acknowledgement fails now, and no one waits for room."""
        self._lost = error
        for ack in set(self._pending.values()):
            if not ack.done.done():
                ack.done.set_exception(error)
        self._pending.clear()
        self._room.set()
        if self._end_timer is not None:
            self._end_timer.cancel()
            self._end_timer = None
        if self._congested_since is not None:
            # the episode ends with its connection (whose loss the runner logs): its end is said, once
            log.info(
                "%s: publish window closed with its connection after %.1fs of congestion",
                self.name,
                time.monotonic() - self._congested_since,
            )
            self._congested_since = None


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
        self._window = _PublishWindow(config.max_inflight_messages, name="uplink[platform]")
        self._window.fail_all(aiomqtt.MqttError("not connected"))  # a fresh one per connection
        #: set when the current connection ends: publishes in flight on it fail at once (a new one per connection)
        self._lost = asyncio.Event()
        self.connected = asyncio.Event()
        #: set by the runner: called on every (re)connection
        self.on_connected: Callable[[], None] | None = None
        # the shared reconnect policy (gateway/reconnect.py): fast first retry, doubling to reconnect_max while the
        # broker stays away, reset by a session that announced itself, one log line per outage and per recovery
        self._reconnect = ReconnectPolicy(
            "uplink[platform]", RetryTiming(first=reconnect_min, maximum=reconnect_max), logger=log
        )
        self.published = 0
        self.commands_received = 0
        #: which broker of the list the uplink uses, and how often it moved on (gateway/mqtt_connection.py)
        self.brokers = config.rotation()

    # -- connection ---------------------------------------------------------------------------------------------

    def _make_client(self) -> aiomqtt.Client:
        # Called for every connection: the password file is re-read and the TLS context rebuilt each time, so a
        # rotated password or renewed certificate is used without a restart (gateway/mqtt_connection.py). Their
        # errors are OSErrors (SecretFileError, ssl.SSLError, FileNotFoundError): a failed connect, retried.
        secret = self.config.resolved_password()
        password = secret.reveal() if secret is not None else None
        broker = self.config.broker(self.brokers)
        will = aiomqtt.Will(
            f"{self.base}/status",
            contract.will_payload(connected_ms=_now_ms(), version=__version__),
            qos=1,
            retain=True,
        )
        client = aiomqtt.Client(
            broker.host,
            port=broker.port,
            identifier=self.client_id,
            # a persistent session: the broker keeps the command subscription, and the QoS 1 commands sent while
            # the gateway was away, until it is back on that broker (on a cluster, on any node). Publishing does
            # not depend on it: the outbox resends whatever was not acknowledged.
            clean_session=False,
            username=self.config.username,
            password=password,
            will=will,
            keepalive=int(self.config.keepalive),
            tls_context=tls_context(self.config.tls),
            max_inflight_messages=self.config.max_inflight_messages,
            timeout=self.config.delivery.timeout,
        )
        # aiomqtt warns on every call while more than 10 are pending (166 lines in one broker bounce); the window
        # bounds what is pending, so warn only if that bound is ever broken
        client.pending_calls_threshold = self.config.max_inflight_messages + _PENDING_HEADROOM
        return client

    async def maintain(self, closing: asyncio.Event) -> None:
        """Connect, announce (status online, meta), listen for commands; reconnect with backoff until closing."""
        while not closing.is_set():
            failure: BaseException | None = None
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
                failure = group.exceptions[0]
                while isinstance(failure, BaseExceptionGroup):  # the session's own task group: say the cause
                    failure = failure.exceptions[0]
            finally:
                self._client = None
                self.connected.clear()
            if closing.is_set():
                return
            failed_broker = self.config.broker(self.brokers)
            reason = f"platform broker {failed_broker} unavailable: {failure or 'session ended'}"
            # a broker list moves on at once to the next broker and backs off once every one has failed in a row
            # (gateway/mqtt_connection.py, BrokerRotation). Nothing is lost by moving: the runner acks the outbox
            # only over PUBACKs, so what the old broker did not acknowledge is sent again to the new one.
            if self.brokers.failed():
                log.log(
                    logging.DEBUG if self._reconnect.down else logging.WARNING,
                    "%s; failing over to %s",
                    reason,
                    self.brokers.current,
                )
                continue
            wait = self._reconnect.failed(reason)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await closing.wait()

    async def _abandon_on_close(self, closing: asyncio.Event) -> None:
        """Return when closing is set before a connection exists; while connected, the session says goodbye."""
        await closing.wait()
        if self.connected.is_set():
            await asyncio.Event().wait()  # connected: the session ends itself, with its goodbye, and cancels this

    async def _session(self, closing: asyncio.Event) -> None:
        """One connection, from connect to goodbye (closing) or loss (raises)."""
        client = self._make_client()
        # aiomqtt keeps the loss in a future that only its own publish and message calls await; it replaces it with
        # a fresh one when the connection was lost while it was being opened, and paho may report a loss after the
        # session has ended (a broker node killed: the keepalive runs out later). This uplink publishes through paho,
        # so nobody retrieved those, and asyncio logged "Future exception was never retrieved" at garbage
        # collection. The loss is handled here (maintain reconnects and logs it once): mark each retrieved, now or
        # when it completes.
        first = client._disconnected
        try:
            await self._connected_session(client, closing)
        finally:
            for disconnected in {first, client._disconnected}:
                disconnected.add_done_callback(_retrieved)

    async def _connected_session(self, client: aiomqtt.Client, closing: asyncio.Event) -> None:
        async with client:
            await self._announce(client)
            lost = self._lost = asyncio.Event()
            window = self._window = _PublishWindow(self.config.max_inflight_messages, name="uplink[platform]")
            self._hook_acks(client, window)
            self._client = client
            self.connected.set()
            if self.on_connected is not None:
                self.on_connected()
            if self._reconnect.down:
                self._reconnect.succeeded()  # logs the end of the outage, with its length
            else:
                log.info("connected to platform broker %s as %s", self.config.broker(self.brokers), self.client_id)
            try:
                await self._serve(client, closing)
            finally:
                lost.set()  # first, before the client is closed: sends in flight give up now
                window.fail_all(aiomqtt.MqttError("connection lost with publishes in flight"))
            await self._say_goodbye(client)

    @staticmethod
    def _hook_acks(client: aiomqtt.Client, window: _PublishWindow) -> None:
        """Count PUBACKs in ``window`` as well as in aiomqtt (its own publishes: status, meta, goodbye)."""
        # aiomqtt 2.x exposes no per-message-id hook: its paho client is used directly (aiomqtt pinned in pyproject)
        paho = client._client
        aiomqtt_on_publish = paho.on_publish

        def on_publish(*args: Any) -> None:
            # paho 2.x, callback API 2: (client, userdata, mid, reason_code, properties)
            window.acked(args[2])
            if aiomqtt_on_publish is not None:
                aiomqtt_on_publish(*args)

        paho.on_publish = on_publish

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

    def broker_status(self) -> dict[str, str | int]:
        """The broker in use (or being tried) and the failovers so far, for /api/uplinks and /metrics."""
        return {"broker": str(self.brokers.current), "failovers": self.brokers.failovers}

    async def close(self) -> None:
        """The connection is owned by ``maintain``, which ends it; the command side (its journal) is released."""
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            on_close()

    # -- delivery -----------------------------------------------------------------------------------------------

    async def send(self, batch: UplinkBatch) -> None:
        client, window = self._client, self._window
        if client is None or self._lost.is_set():
            raise UplinkError(f"not connected to platform broker {self.config.broker(self.brokers)}", retryable=True)
        if batch.kind == "telemetry":
            v2 = self.config.telemetry_version == 2
            build = contract.telemetry_messages_v2 if v2 else contract.telemetry_messages
            messages: Iterable[tuple[str, bytes, bool]] = (
                (topic, payload, False)
                for topic, payload in build(self.base, batch.telemetry, historical=batch.historical, shared=self.shared)
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
        paho = client._client  # see _hook_acks
        ack = _BatchAck(asyncio.get_running_loop().create_future())
        try:
            for topic, payload, retain in messages:
                if len(window) >= window.limit:
                    await window.wait_for_room()
                info = paho.publish(topic, payload, qos, retain)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise aiomqtt.MqttCodeError(info.rc, "could not publish")
                if not info.is_published():  # QoS 0 may be written, hence done, before publish() returns
                    window.track(info.mid, ack)
                self.published += 1
            ack.seal()
            await ack.done
        except aiomqtt.MqttError as exc:
            raise UplinkError(f"platform broker: {exc}", retryable=True) from None
        finally:
            if not ack.done.done():
                ack.done.cancel()  # cancelled (the runner's timeout): acks still arriving are counted and ignored


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # read: asyncio no longer reports it as never retrieved


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
