"""Where the receiver's messages come from: a NATS JetStream durable consumer, or an MQTT shared subscription.

Both deliver at least once and are acknowledged only after the receiver committed a batch (``Source.ack``):
    ``JetStreamSource``  nats-py, one durable pull consumer shared by every receiver process; a message not acked
                         within ``ack_wait`` (its receiver died) goes to another. By default the consumer is on
                         ``$MQTT_msgs``, where NATS's MQTT side stores every QoS 1 message before it answers PUBACK
                         (nats-server 2.9, ``mqttProcessPub``), filtered to ``$MQTT.msgs.{prefix}.>``: that
                         stream's interest retention keeps each message until this durable consumer acks it. The
                         plain-subject copy is fire-and-forget: a stream capturing ``{prefix}.>`` lost whole
                         acknowledged bursts while a node was down, and one sourcing ``$MQTT_msgs`` lost a few
                         (both seen in the fleet test). ``capture="subjects"`` makes a stream (``PLATFORM``,
                         ``replicas`` copies) over ``{prefix}.>`` for publishers that speak NATS.
    ``MqttSharedSource`` paho-mqtt with manual acks on ``$share/{group}/{prefix}/#``, a persistent session per
                         receiver (a fixed client id): what a killed receiver held unacked is sent to it again when it
                         comes back (Mosquitto keeps it in its session).
Library errors stay here: a lost connection is retried by the client libraries themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("gateway.platform")

#: where NATS's MQTT side stores every QoS 1 publish before it answers PUBACK (nats-server 2.9, server/mqtt.go)
MQTT_MSGS_STREAM = "$MQTT_msgs"
MQTT_MSGS_PREFIX = "$MQTT.msgs."


@dataclass(slots=True)
class NatsDelivery:
    topic: str
    payload: bytes
    msg: Any


class JetStreamSource:
    def __init__(
        self,
        *,
        servers: Sequence[str],
        prefix: str = "city",
        stream: str = "PLATFORM",
        durable: str = "platform-receiver",
        replicas: int = 3,
        batch: int = 500,
        ack_wait: float = 30.0,
        linger: float = 0.05,
        capture: str = "mqtt",
    ) -> None:
        if capture not in ("mqtt", "subjects"):
            raise ValueError(f"capture {capture!r} is neither 'mqtt' nor 'subjects'")
        if not servers:
            raise ValueError("at least one NATS server URL is needed")
        if replicas < 1 or batch < 1 or ack_wait <= 0:
            raise ValueError("replicas and batch must be 1 or more, ack_wait positive")
        self.servers = list(servers)
        self.prefix = prefix
        self.stream = stream
        self.durable = durable
        self.replicas = replicas
        self.batch = batch
        self.ack_wait = ack_wait
        self.linger = linger
        self.capture = capture
        self._nc: Any = None
        self._sub: Any = None

    async def __aenter__(self) -> JetStreamSource:
        import nats
        import nats.errors

        reported: set[str] = set()

        async def on_error(exc: Exception) -> None:
            # nats-py logs a traceback per failed attempt by default; one line per kind of error is enough
            if type(exc).__name__ not in reported:
                reported.add(type(exc).__name__)
                log.warning("platform: NATS: %s", exc or type(exc).__name__)

        async def on_reconnected() -> None:
            reported.clear()
            log.info("platform: NATS connection back")

        self._nc = await nats.connect(
            servers=self.servers, max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=5,
            error_cb=on_error, reconnected_cb=on_reconnected,
        )  # fmt: skip
        # a cluster that lost a node, or is electing a leader, answers JetStream requests with timeouts for a
        # while: keep asking (logged once), as the receiver would after any other outage
        delay, logged = 0.5, False
        while True:
            try:
                await self._subscribe()
                break
            except (TimeoutError, nats.errors.Error) as exc:
                if not logged:
                    log.warning("platform: JetStream not ready (%s); retrying", exc or type(exc).__name__)
                    logged = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if logged:
            log.info("platform: JetStream ready")
        return self

    async def _subscribe(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
        from nats.js.errors import BadRequestError

        js = self._nc.jetstream(timeout=10)
        consumer = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait, max_ack_pending=self.batch * 20
        )
        if self.capture == "mqtt":
            # NATS's MQTT side PUBACKs a QoS 1 publish only once JetStream stored it in $MQTT_msgs (as
            # $MQTT.msgs.<subject>); the copy on the plain subject is fire-and-forget. The durable consumer on
            # $MQTT_msgs is replicated interest: that stream keeps each message until this consumer acks it.
            await self._wait_mqtt_stream(js)
            self._sub = await js.pull_subscribe(
                f"{MQTT_MSGS_PREFIX}{self.prefix}.>", durable=self.durable, stream=MQTT_MSGS_STREAM, config=consumer
            )
            return
        config = StreamConfig(
            name=self.stream, subjects=[f"{self.prefix}.>"], num_replicas=self.replicas, storage=StorageType.FILE
        )
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.stream_info(self.stream)  # made meanwhile by another receiver: it must exist now
        self._sub = await js.pull_subscribe(
            f"{self.prefix}.>", durable=self.durable, stream=self.stream, config=consumer
        )

    async def _wait_mqtt_stream(self, js: Any) -> None:
        """$MQTT_msgs exists once the first MQTT client connected to the cluster; until then there is nothing to
        lose (no MQTT publisher has been acknowledged)."""
        from nats.js.errors import NotFoundError

        logged = False
        while True:
            try:
                await js.stream_info(MQTT_MSGS_STREAM)
                return
            except NotFoundError:
                if not logged:
                    log.warning(
                        "platform: waiting for %s (NATS's MQTT side creates it on the first MQTT connection)",
                        MQTT_MSGS_STREAM,
                    )
                    logged = True
                await asyncio.sleep(0.5)

    async def __aexit__(self, *exc: object) -> None:
        if self._nc is not None:
            # close, not drain: every batch handled is acked already, and what is not is redelivered anyway
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def batches(self, stopping: asyncio.Event) -> AsyncIterator[Sequence[NatsDelivery]]:
        import nats.errors  # here, not at the top: an MQTT-only receiver does not load the NATS client

        while not stopping.is_set():
            try:
                msgs = await self._sub.fetch(self.batch, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.Error as exc:
                # a node down, a leader election: the client reconnects by itself; try again shortly
                log.info("platform: JetStream fetch failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            # a short batch is topped up for up to `linger` s: each batch costs a TSDB request and a commit, so
            # under load fewer, fuller batches cost less CPU per message (latency + linger at most)
            deadline = asyncio.get_running_loop().time() + self.linger
            while len(msgs) < self.batch and (left := deadline - asyncio.get_running_loop().time()) > 0.005:
                try:
                    msgs.extend(await self._sub.fetch(self.batch - len(msgs), timeout=left))
                except (TimeoutError, nats.errors.Error):
                    break
            # NATS's MQTT gateway maps topic levels to subject tokens (a/b -> a.b)
            yield [NatsDelivery(m.subject.removeprefix(MQTT_MSGS_PREFIX).replace(".", "/"), m.data, m) for m in msgs]

    async def ack(self, batch: Sequence[Any]) -> None:
        for delivery in batch:
            # an ack lost with a node is redelivered after ack_wait and found already seen: harmless
            with contextlib.suppress(Exception):
                await delivery.msg.ack()


@dataclass(slots=True)
class MqttDelivery:
    topic: str
    payload: bytes
    mid: int
    qos: int


class MqttSharedSource:
    def __init__(
        self,
        *,
        host: str,
        port: int = 1883,
        prefix: str = "city",
        group: str = "platform-receiver",
        client_id: str,
        shared: bool = True,
        batch: int = 500,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if not client_id:
            raise ValueError("an MQTT receiver needs a fixed client id: its session keeps what it has not acked")
        self.host, self.port = host, port
        self.topic = f"$share/{group}/{prefix}/#" if shared else f"{prefix}/#"
        self.client_id = client_id
        self.batch = batch
        self.username, self.password = username, password
        self._queue: asyncio.Queue[MqttDelivery] = asyncio.Queue()
        self._client: Any = None
        self._lock = threading.Lock()

    async def __aenter__(self) -> MqttSharedSource:
        import paho.mqtt.client as mqtt

        loop = asyncio.get_running_loop()
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False, manual_ack=True
        )
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        client.max_inflight_messages_set(1000)
        topic = self.topic
        subscribed = asyncio.Event()

        def on_connect(c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if not reason.is_failure:
                c.subscribe(topic, qos=1)

        def on_subscribe(_c: Any, _u: Any, _mid: Any, reasons: Any, _p: Any) -> None:
            if reasons and not reasons[0].is_failure:
                loop.call_soon_threadsafe(subscribed.set)

        def on_message(_c: Any, _u: Any, message: Any) -> None:
            delivery = MqttDelivery(message.topic, bytes(message.payload), message.mid, message.qos)
            loop.call_soon_threadsafe(self._queue.put_nowait, delivery)

        client.on_connect = on_connect
        client.on_message = on_message
        client.on_subscribe = on_subscribe
        client.reconnect_delay_set(1, 5)
        client.connect_async(self.host, self.port, keepalive=30)
        client.loop_start()
        self._client = client
        # ready only once the broker holds the subscription: from then on its session keeps what arrives
        await asyncio.wait_for(subscribed.wait(), timeout=30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()

    async def batches(self, stopping: asyncio.Event) -> AsyncIterator[Sequence[MqttDelivery]]:
        while not stopping.is_set():
            try:
                first = await asyncio.wait_for(self._queue.get(), 0.5)
            except TimeoutError:
                continue
            batch = [first]
            # what has arrived meanwhile joins the batch: one TSDB write and one commit for many messages
            await asyncio.sleep(0.02)
            while len(batch) < self.batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            yield batch

    async def ack(self, batch: Sequence[Any]) -> None:
        for delivery in batch:
            if delivery.qos > 0:
                self._client.ack(delivery.mid, delivery.qos)
