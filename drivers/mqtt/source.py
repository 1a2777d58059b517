"""The MQTT sensor source the supervisor runs: one per ``mqtt_sources:`` entry (one broker connection).

Owns: ``MqttSource`` (reconnect loop with bounded backoff, failover over a ``brokers:`` list and resubscription, the
pending batch and its flusher, manual acks after hand-off, writes to command topics, status and counters) and
``build_sources(site)``.

Must not import the supervisor, bus or outbox: batches leave through the ``publish`` sink it is given. paho is reached
only through ``drivers.mqtt.client``.

Batching: every message is decoded, in the socket's read callback, straight into ``_pending``. The flusher task wakes
when the first sample of a batch arrives, lingers ``batch_linger`` (default 5 ms) so a burst coalesces, and hands
the whole list to ``publish``. While ``publish`` is awaited (the outbox committing) messages keep accumulating; past
``4 x batch_max_samples`` the socket is no longer read, so TCP flow control holds the broker back instead of memory
growing without bound. QoS 1/2 messages are acknowledged only after the batch holding them was handed on, so a crash
between receive and hand-off makes the broker send them again (at-least-once, end to end).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

import orjson
import paho.mqtt.client as paho

from drivers.mqtt.client import MqttConnection
from drivers.mqtt.config import MqttCommandSpec, MqttDeviceConfig, MqttPointSpec, MqttSourceConfig, check_bindings
from drivers.mqtt.ingest import Ingest, SubscriptionStats
from gateway.config.site import Site
from gateway.driver_api import BatchSink, DeviceState, DeviceStatus
from gateway.errors import ConfigError, DeviceError, DeviceUnavailable, WriteRejected
from gateway.model import Command, Sample, Value
from gateway.reconnect import ReconnectPolicy, RetryTiming

log = logging.getLogger("drivers.mqtt")

_WRITE_TIMEOUT = 10.0
#: how often keepalive is serviced (paho sends PINGREQ and detects an unanswered one from here)
_TICK = 0.5


class MqttSource:
    """Reads one broker's subscriptions into batches of samples; publishes commands to configured topics."""

    def __init__(self, config: MqttSourceConfig, devices: list[MqttDeviceConfig]) -> None:
        self.config = config
        self.name = f"mqtt[{config.id}]"
        self._devices = {d.id: d for d in devices}
        self.ingest = Ingest(config, devices)
        self._pending: list[Sample] = []
        self._pending_acks: list[tuple[int, int]] = []
        self._has_data = asyncio.Event()
        self._connection: MqttConnection | None = None
        #: bumped at each new connection: acks of messages received on an older one are never sent
        self._generation = 0
        self._closing = False
        self._max_pending = 4 * config.batch_max_samples
        # --- state and counters, read by status(), /metrics and the tests ---
        self.connected = False
        self.session_state = "disconnected"
        self.connects = 0
        self.disconnects = 0
        self.last_error: str | None = None
        self.messages = 0
        self.samples_published = 0
        self.batches_published = 0
        self.reads_paused = 0
        #: which broker of the list this source uses, and how often it moved on (gateway/mqtt_connection.py)
        self.brokers = config.rotation()

    # --- the driver contract -------------------------------------------------------------------------------------

    @property
    def devices(self) -> frozenset[str]:
        return frozenset(self._devices)

    def status(self) -> list[DeviceStatus]:
        """One status per device: a message is a poll, a rejected one (malformed, refused) a failed poll; the
        device is offline while the broker is away or its availability topic says so."""
        out = []
        for device in self._devices:
            counters = self.ingest.counters[device]
            status = DeviceStatus(
                device=device,
                driver="mqtt",
                polls=counters.messages,
                errors=counters.rejected,
                last_ok_ns=counters.last_ok_ns,
            )
            if not self.connected:
                status.state = DeviceState.OFFLINE if self.connects else DeviceState.UNKNOWN
                status.last_error = self.last_error
            elif counters.available is False:
                status.state = DeviceState.OFFLINE
                status.last_error = f"offline (availability: {counters.availability_topic})"
            elif counters.accepted or counters.available:
                status.state = DeviceState.ONLINE
            else:
                status.state = DeviceState.UNKNOWN
            status.info.update(self.broker_info())
            if status.state is not DeviceState.OFFLINE and counters.rejected and status.last_error is None:
                status.last_error = self._last_rejection(device)
            out.append(status)
        return out

    def broker_info(self) -> dict[str, int | float | str | None]:
        """The broker in use (or being tried) and the failovers so far, for /api/devices and /metrics."""
        return {"broker": str(self.brokers.current), "failovers": self.brokers.failovers}

    def _last_rejection(self, device: str) -> str:
        counters = self.ingest.counters[device]
        parts = [f"{reason} {n}" for reason, n in sorted(counters.malformed.items())]
        parts += [f"refused {reason} {n}" for reason, n in sorted(counters.refused.items())]
        return f"{counters.rejected} of {counters.messages} messages rejected ({', '.join(parts)})"

    def device_counters(self) -> dict[str, dict[str, Any]]:
        """Per device: messages, rejected, malformed and refused (by reason), unavailable, undeclared fields."""
        return {device: counters.as_dict() for device, counters in self.ingest.counters.items()}

    def source_counters(self) -> dict[str, Any]:
        """The same counters summed over this source's devices, plus what reached no device."""
        total: dict[str, Any] = {
            "messages": 0,
            "rejected": 0,
            "malformed": 0,
            "refused": 0,
            "unavailable": 0,
            "undeclared": 0,
            "malformed_by_reason": {},
            "refused_by_reason": {},
        }
        for counters in self.device_counters().values():
            for key in ("messages", "rejected", "malformed", "refused", "unavailable", "undeclared"):
                total[key] += counters[key]
            for key in ("malformed_by_reason", "refused_by_reason"):
                for reason, n in counters[key].items():
                    total[key][reason] = total[key].get(reason, 0) + n
        total["unmapped"] = sum(stats.unmapped for stats in self.ingest.stats.values()) + self.ingest.unrouted
        total["availability_unrecognised"] = self.ingest.availability_unrecognised
        total.update(self.broker_info())
        return total

    def subscription_stats(self) -> dict[str, SubscriptionStats]:
        return self.ingest.stats

    def metrics(self) -> dict[str, Any]:
        """Flat counters for /metrics: session state plus per-subscription message and malformed counts."""
        return {
            "connected": int(self.connected),
            "connects": self.connects,
            "disconnects": self.disconnects,
            "messages": self.messages,
            "samples_published": self.samples_published,
            "batches_published": self.batches_published,
            "reads_paused": self.reads_paused,
            "failovers": self.brokers.failovers,
            "pending_samples": len(self._pending),
            "subscriptions": {
                sub_id: {
                    "messages": stats.messages,
                    "malformed": stats.malformed,
                    "unmapped": stats.unmapped,
                    "malformed_by_reason": dict(stats.malformed_by_reason),
                }
                for sub_id, stats in self.ingest.stats.items()
            },
            "devices": self.device_counters(),
            "availability_messages": self.ingest.availability_messages,
            "availability_unrecognised": self.ingest.availability_unrecognised,
        }

    async def run(self, publish: BatchSink, stopping: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tasks:
            flusher = tasks.create_task(self._flush_loop(publish), name=f"{self.name}.flush")
            tasks.create_task(self._session_loop(stopping, flusher), name=f"{self.name}.session")

    async def write(self, command: Command) -> None:
        device, _, point = command.point.partition(".")
        config = self._devices.get(device)
        spec = config.points.get(point) if config is not None else None
        if spec is None:
            raise WriteRejected(f"{command.point} is not a point of {self.name}")
        if spec.command is None:
            raise WriteRejected(f"{command.point} is not writable (it has no command topic)")
        if command.relinquish or command.priority is not None:
            # an MQTT command topic carries a value; there is no priority slot to pick or to release
            what = "a relinquish" if command.relinquish else f"priority {command.priority}"
            raise WriteRejected(
                f"{command.point}: MQTT points have no write priorities, {what} cannot be honoured (remove "
                "priority/relinquish from its allow entry, or write a value)"
            )
        if command.value is None:
            raise WriteRejected(f"{command.point}: a write needs a value")
        payload = encode_command(spec, spec.command, command.value, command.point)
        connection = self._connection
        if connection is None or not connection.connected:
            raise DeviceUnavailable(f"{self.name} is not connected to its broker")
        await connection.publish(
            spec.command.topic, payload, qos=spec.command.qos, retain=spec.command.retain, wait_s=_WRITE_TIMEOUT
        )

    # --- receiving -------------------------------------------------------------------------------------------------

    def _on_publish(self, topic: bytes, payload: bytes, received_ns: int) -> None:
        """A QoS 0 message from the connection's fast path (the usual case): no acknowledgement to keep."""
        self.messages += 1
        try:
            text = topic.decode()
        except UnicodeDecodeError:  # as in _on_message: the broker should have refused it
            self.ingest.unrouted += 1
            return
        pending = self._pending
        self.ingest.ingest(text, payload, received_ns, pending)
        if pending:
            self._has_data.set()
            if len(pending) >= self._max_pending and self._connection is not None:
                self._connection.pause_reading()
                self.reads_paused += 1

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        """A message through paho: QoS 1/2 (acknowledged after hand-off) or one split across socket reads."""
        pending = self._pending
        self.messages += 1
        try:
            topic = message.topic
        except UnicodeDecodeError:  # the broker should have refused it (MQTT topics are UTF-8): count, go on
            self.ingest.unrouted += 1
            topic = ""
        if topic:
            self.ingest.ingest(topic, bytes(message.payload), time.time_ns(), pending)
        if message.qos:
            self._pending_acks.append((message.mid, message.qos))
        if pending or self._pending_acks:
            self._has_data.set()
            if len(pending) >= self._max_pending and self._connection is not None:
                self._connection.pause_reading()
                self.reads_paused += 1

    async def _flush_loop(self, publish: BatchSink) -> None:
        linger = self.config.batch_linger
        limit = self.config.batch_max_samples
        while True:
            await self._has_data.wait()
            if not self._closing and linger > 0 and len(self._pending) < limit:
                await asyncio.sleep(linger)
            self._has_data.clear()
            batch, self._pending = self._pending, []
            acks, self._pending_acks = self._pending_acks, []
            generation = self._generation
            stored: bool | None = True
            if batch:
                stored = await publish(batch)  # returns once the outbox has committed it
                self.samples_published += len(batch)
                self.batches_published += 1
            connection = self._connection
            # never acknowledge what is not on disk: unacknowledged, the broker delivers it again after a restart
            if (
                acks
                and stored is not False
                and connection is not None
                and connection.connected
                and generation == self._generation
            ):
                for mid, qos in acks:
                    connection.ack(mid, qos)
            if connection is not None:
                connection.resume_reading()
            if self._closing and not self._pending and not self._pending_acks:
                return

    # --- the session ------------------------------------------------------------------------------------------------

    async def _session_loop(self, stopping: asyncio.Event, flusher: asyncio.Task[None]) -> None:
        loop = asyncio.get_running_loop()
        # the shared policy (gateway/reconnect.py): a fast first retry, doubling while the broker stays away, reset
        # by a subscription the broker accepted (not by a TCP connect), one log line per outage and per recovery
        policy = ReconnectPolicy(
            self.name, RetryTiming(first=self.config.reconnect_min, maximum=self.config.reconnect_max), logger=log
        )
        subscriptions = [(sub.topic, sub.qos) for sub in self.config.subscriptions]
        # an availability filter equal to a subscription's is subscribed once (a broker would send it twice)
        subscriptions += list(
            dict.fromkeys(
                (entry.topic, entry.qos)
                for entry in self.config.availability
                if entry.topic not in {topic for topic, _ in subscriptions}
            )
        )
        stop_wait = asyncio.ensure_future(stopping.wait())
        try:
            while not stopping.is_set():
                connection = MqttConnection(
                    self.config,
                    on_message=self._on_message,
                    on_publish=self._on_publish,
                    loop=loop,
                    broker=self.config.broker(self.brokers),
                )
                reason: str
                try:
                    self.session_state = "connecting"
                    session_present = await _unless_stopped(connection.open(), stop_wait)
                    if session_present is None:
                        break
                    self._generation += 1
                    self._connection = connection
                    if await _unless_stopped(connection.subscribe(subscriptions), stop_wait, done=True) is None:
                        break
                    self.connected = True
                    self.connects += 1
                    self.session_state = "connected"
                    policy.succeeded()
                    log.info(
                        "%s: connected to %s (%s session%s), subscribed to %d filters",
                        self.name,
                        connection.broker,
                        self.config.session,
                        ", resumed" if session_present else "",
                        len(subscriptions),
                    )
                    reason = await self._serve(connection, stop_wait)
                except DeviceError as exc:
                    reason = str(exc)
                if stopping.is_set():
                    break
                await self._drop(connection)
                self.last_error = reason
                if policy.down:
                    log.debug("%s: reconnect failed: %s", self.name, reason)
                failed_broker = connection.broker
                # a broker list moves on at once to the next broker, and backs off once every one has failed in a
                # row (gateway/mqtt_connection.py, BrokerRotation); a single broker always backs off
                if self.brokers.failed():
                    # once per outage at warning level, like the policy's own line: not once per hop
                    log.log(
                        logging.DEBUG if policy.down else logging.WARNING,
                        "%s: broker %s failed (%s); failing over to %s",
                        self.name,
                        failed_broker,
                        reason,
                        self.brokers.current,
                    )
                    continue
                wait = policy.failed(f"broker connection down: {reason}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stop_wait), wait)
            await self._shutdown(flusher)
        finally:
            stop_wait.cancel()
            if self._connection is not None:
                await self._connection.close()
                self._connection = None
            self.connected = False
            self.session_state = "stopped"

    async def _serve(self, connection: MqttConnection, stop_wait: asyncio.Future[Any]) -> str:
        """Service keepalive until the session ends or the source is stopped; returns why it ended."""
        while True:
            done, _ = await asyncio.wait((connection.closed, stop_wait), timeout=_TICK)
            if connection.closed in done:
                return connection.closed.result()
            if stop_wait in done:
                return "stopping"
            connection.tick()

    async def _drop(self, connection: MqttConnection) -> None:
        if self.connected:
            self.disconnects += 1
        self.connected = False
        self.session_state = "disconnected"
        # acks of this session's messages can never be sent now: the broker redelivers them (persistent session)
        self._pending_acks = []
        self._connection = None
        await connection.close()

    async def _shutdown(self, flusher: asyncio.Task[None]) -> None:
        """Stop reading, hand on everything already decoded (acking it), then disconnect cleanly."""
        if self._connection is not None:
            self._connection.pause_reading()
        self._closing = True
        self._has_data.set()
        await flusher


async def _unless_stopped(work: Any, stop_wait: asyncio.Future[Any], *, done: bool = False) -> Any:
    """Await ``work`` unless stopping comes first (then None). ``done`` marks work whose result is None."""
    task = asyncio.ensure_future(work)
    finished, _ = await asyncio.wait((task, stop_wait), return_when=asyncio.FIRST_COMPLETED)
    if task in finished:
        result = task.result()
        return True if done else result
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, DeviceError):
        await task
    return None


def encode_command(spec: MqttPointSpec, command: MqttCommandSpec, value: Value, point: str) -> bytes:
    """The payload a write publishes, after checking the value against the point's kind and bounds."""
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise WriteRejected(f"{point} is a boolean point; got {value!r}")
        wire: Value = command.true if value else command.false
    elif spec.kind in ("float", "int"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise WriteRejected(f"{point} takes a number; got {value!r}")
        if spec.kind == "int" and not float(value).is_integer():
            raise WriteRejected(f"{point} takes an integer; got {value!r}")
        if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
            raise WriteRejected(f"{point}: {value} is outside [{spec.min}, {spec.max}]")
        wire = int(value) if spec.kind == "int" else value
    else:
        if not isinstance(value, str):
            raise WriteRejected(f"{point} takes a string; got {value!r}")
        wire = value
    if command.key is not None:
        return orjson.dumps({command.key: wire})
    if isinstance(wire, bool):
        return b"true" if wire else b"false"
    return str(wire).encode("utf-8")


def build_sources(site: Site) -> list[MqttSource]:
    """One source per ``mqtt_sources:`` entry that has devices; raises ConfigError for inconsistent bindings."""
    config = site.config
    devices = [d for d in config.devices if isinstance(d, MqttDeviceConfig)]
    mqtt_sources = config.section("mqtt_sources", MqttSourceConfig)
    problems = check_bindings(mqtt_sources, devices)
    if problems:
        raise ConfigError([site.diagnostic(("mqtt_sources",), message) for message in problems])
    sources = []
    for source in mqtt_sources:
        mine = [d for d in devices if d.source == source.id]
        if not mine:
            log.warning("mqtt[%s]: no device uses this source; it is not started", source.id)
            continue
        sources.append(MqttSource(source, mine))
    return sources
