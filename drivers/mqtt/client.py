"""One MQTT session with the building's broker: paho-mqtt driven by the asyncio loop's own socket callbacks.

Owns: ``MqttConnection`` (connect, CONNACK, subscribe, publish with PUBACK, manual acks, keepalive, close), the
translation of paho's return codes and reason codes into ``DeviceUnavailable``/``DeviceRejected`` (reconnect delays are
the shared ``gateway.reconnect`` policy's).
This is the only module of the driver that imports paho.

Why paho and not aiomqtt: aiomqtt costs about twice the CPU per message (FIELD-NOTES.md) and its ceiling on this
class of machine is below the 20k msg/s goal. Here paho runs without a thread: its socket is registered with
``loop.add_reader``, so a message is decoded in the event loop's thread straight into the source's pending batch, with
no queue, no lock and no task per message. Only the blocking TCP/TLS connect runs in an executor thread, before any
socket callback is registered, so the event loop is never blocked by a slow or unreachable broker.

Reading: paho reads a packet with at least three ``recv`` calls (command byte, each length byte, body) and builds an
``MQTTMessage`` (with a ``threading.Condition``) per message, which cost more CPU than all of the driver's decoding.
``_BufferedClient`` serves paho's reads from one ``recv`` of up to 64 KiB, and the connection dispatches the complete
QoS 0 PUBLISH packets at the head of that buffer itself (``parse_qos0_publish``, a few slices per message) to
``on_publish``. Everything else (QoS 1/2 with their acks, CONNACK, SUBACK, PINGRESP, a packet split across reads,
anything malformed) goes through paho unchanged, from the same buffer, so paho's protocol handling and errors stay
the reference and the fast path only ever skips work for packets it fully understands.

Not thread-safe: every method must be called on the event loop that opened the connection.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from drivers.mqtt.config import MqttSourceConfig
from gateway.errors import DeviceRejected, DeviceUnavailable
from gateway.mqtt_connection import BrokerAddress, SecretFileError, tls_context

log = logging.getLogger("drivers.mqtt")

#: one socket read: about 550 messages of the usual sensor size
_RECV_BYTES = 64 * 1024
#: socket reads (each dispatched before the next) per readable event before the loop gets a turn (keeps timers and
#: writes responsive); paho handles at most one packet per read
_READ_BURST = 4
#: QoS 0 PUBLISH packets are a 0x3_ header with both QoS bits clear (DUP and RETAIN may be set)
_QOS0_PUBLISH_MASK = 0xF6
_QOS0_PUBLISH = 0x30

#: a QoS 0 message off the fast path: (topic bytes, payload bytes, receive time in ns)
PublishHandler = Callable[[bytes, bytes, int], None]


def parse_qos0_publish(buffer: bytes, pos: int, v5: bool) -> tuple[int, bytes, bytes] | None:
    """The QoS 0 PUBLISH packet starting at ``buffer[pos]``: ``(end, topic, payload)``, or None when the bytes there
    are not a complete, well-formed QoS 0 PUBLISH with a topic (then paho reads them: it owns every other case,
    including the errors). MQTT 5 properties are skipped: no decoder uses them, and the connection asks for no
    topic aliases (an aliased PUBLISH has an empty topic, which is left to paho)."""
    end = len(buffer)
    if pos >= end or buffer[pos] & _QOS0_PUBLISH_MASK != _QOS0_PUBLISH:
        return None
    i, length, shift = pos + 1, 0, 0
    while True:  # remaining length: 1 to 4 bytes, 7 bits each, least significant first
        if i >= end or shift > 21:
            return None
        byte = buffer[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    body_end = i + length
    if length < 2 or body_end > end:
        return None
    topic_start = i + 2
    topic_end = topic_start + (buffer[i] << 8 | buffer[i + 1])
    if topic_end == topic_start or topic_end > body_end:
        return None
    payload_start = topic_end
    if v5:
        props_length, shift = 0, 0
        while True:
            if payload_start >= body_end or shift > 21:
                return None
            byte = buffer[payload_start]
            payload_start += 1
            props_length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        payload_start += props_length
        if payload_start > body_end:
            return None
    return body_end, buffer[topic_start:topic_end], buffer[payload_start:body_end]


class _BufferedClient(paho.Client):
    """paho's client with its socket reads served from one large ``recv`` (see the module docstring).

    ``read_buffer[read_pos:]`` is what was received and not yet consumed by paho or the fast path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_buffer = b""
        self.read_pos = 0

    def has_buffered(self) -> bool:
        return self.read_pos < len(self.read_buffer)

    def _sock_recv(self, bufsize: int) -> bytes:
        pos = self.read_pos
        if pos >= len(self.read_buffer):
            # paho's own recv: it translates TLS want-read/want-write and a missing socket; b"" is EOF
            data = super()._sock_recv(_RECV_BYTES)
            if len(data) <= bufsize:
                return data
            self.read_buffer, self.read_pos = data, bufsize
            return data[:bufsize]
        end = min(pos + bufsize, len(self.read_buffer))
        self.read_pos = end
        return self.read_buffer[pos:end]


class MqttConnection:
    """One connect-to-disconnect session. A reconnect is a new ``MqttConnection`` (owned by the source's loop)."""

    def __init__(
        self,
        config: MqttSourceConfig,
        *,
        on_message: Callable[[paho.Client, Any, paho.MQTTMessage], None],
        on_publish: PublishHandler,
        loop: asyncio.AbstractEventLoop,
        broker: BrokerAddress | None = None,
    ) -> None:
        self._config = config
        self._loop = loop
        v5 = config.protocol == "5"
        self._v5 = v5
        self._on_publish_fast = on_publish
        self.client = _BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id or "",
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else config.session == "clean",
            reconnect_on_failure=False,
            manual_ack=config.ack_after_publish,
        )
        self.client.connect_timeout = config.connect_timeout
        #: chosen by the source's broker rotation for this connection (gateway/mqtt_connection.py), the first of
        #: the list without one
        self.broker = broker if broker is not None else config.broker()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = on_message
        self._connack: asyncio.Future[bool] = loop.create_future()
        #: resolves with the reason once the session has ended, for whatever cause
        self.closed: asyncio.Future[str] = loop.create_future()
        self._pending_subacks: dict[int, asyncio.Future[list[Any]]] = {}
        self._pending_pubacks: dict[int, asyncio.Future[None]] = {}
        self._sock: Any = None
        self._reading = False
        self.session_present = False

    # --- paho callbacks (all run on the event loop thread) -----------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self._connack.done():
            return
        if reason.is_failure:
            self._connack.set_exception(DeviceRejected(f"broker refused the connection: {reason}"))
        else:
            self.session_present = bool(flags.session_present)
            self._connack.set_result(self.session_present)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        text = str(reason)
        if text in {"Success", "Normal disconnection"}:
            text = "disconnected"
        elif "Keep alive" in text or "keepalive" in text.lower():
            text = "no traffic and no ping response within the keepalive (stuck connection)"
        self._end(text)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        future = self._pending_subacks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(list(reasons))

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        future = self._pending_pubacks.pop(mid, None)
        if future is None or future.done():
            return
        if getattr(reason, "is_failure", False):
            future.set_exception(DeviceRejected(f"broker refused the publish: {reason}"))
        else:
            future.set_result(None)

    def _end(self, reason: str) -> None:
        if not self._connack.done():
            self._connack.set_exception(DeviceUnavailable(f"connection lost before CONNACK: {reason}"))
        if not self.closed.done():
            self.closed.set_result(reason)
        error = DeviceUnavailable(f"connection lost: {reason}")
        waiting: list[asyncio.Future[Any]] = [*self._pending_subacks.values(), *self._pending_pubacks.values()]
        for future in waiting:
            if not future.done():
                future.set_exception(error)
        self._pending_subacks.clear()
        self._pending_pubacks.clear()

    # --- socket plumbing ---------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if not self._reading:  # a call_soon that arrived after a pause or the socket's close
            return
        client = self.client
        for _ in range(_READ_BURST):
            if client._in_packet["command"] == 0 and client.has_buffered():  # paho is between packets
                self._dispatch_buffered()
                if not self._reading:
                    return
            # one packet through paho: any other packet type, or a refill of the buffer from the socket
            before = client._in_packet["command"], client._last_bytes_received, client.read_pos, client.read_buffer
            if client.loop_read() != paho.MQTT_ERR_SUCCESS or self._sock is None:
                return
            # paho reports "nothing to read" as success too: stop when a read made no progress.
            if (client._in_packet["command"], client._last_bytes_received, client.read_pos, client.read_buffer) == (
                before
            ):
                return
        # Budget spent with messages possibly still buffered: those are in user space, the socket may never turn
        # readable again for them, so the loop is asked to come back after its other work.
        if self._reading and client.has_buffered():
            self._loop.call_soon(self._on_readable)

    def _dispatch_buffered(self) -> None:
        """Hand on the complete QoS 0 PUBLISH packets at the head of the read buffer (stops when reading is
        paused, e.g. by the handler itself when its batch is full)."""
        client = self.client
        buffer, pos, v5 = client.read_buffer, client.read_pos, self._v5
        handler = self._on_publish_fast
        received_ns = time.time_ns()  # one read's messages arrived together
        dispatched = False
        try:
            while self._reading and pos < len(buffer):
                packet = parse_qos0_publish(buffer, pos, v5)
                if packet is None:
                    break
                pos, topic, payload = packet
                dispatched = True
                handler(topic, payload, received_ns)
        finally:
            client.read_pos = pos
            if dispatched:
                client._last_bytes_received = paho.time_func()  # paho's keepalive clock: traffic was seen

    def _on_writable(self) -> None:
        self.client.loop_write()

    def _register_socket(self) -> None:
        sock = self.client.socket()
        if sock is None:
            raise DeviceUnavailable("connection closed during connect")
        self._sock = sock
        self.client.on_socket_close = self._on_socket_close
        self.client.on_socket_register_write = self._on_register_write
        self.client.on_socket_unregister_write = self._on_unregister_write
        self.resume_reading()
        if self.client.want_write():
            self._loop.add_writer(sock, self._on_writable)

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.add_writer(sock, self._on_writable)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.remove_writer(sock)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._reading = False
        self._sock = None

    def pause_reading(self) -> None:
        """Stop reading the socket: TCP flow control then holds the broker back (the batch is full)."""
        if self._reading and self._sock is not None:
            self._loop.remove_reader(self._sock)
            self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and self._sock is not None:
            self._loop.add_reader(self._sock, self._on_readable)
            self._reading = True
            if self.client.has_buffered():  # received before the pause: no readable event will announce it
                self._loop.call_soon(self._on_readable)

    # --- session ---------------------------------------------------------------------------------------------

    def _prepare_blocking(self) -> None:
        # Credentials and TLS are resolved at every connect, in the executor (file reads and OpenSSL's loading stay
        # off the event loop): a password file or certificate rotated on disk is used by the next connection
        # without a restart.
        config = self._config
        if config.username is not None:
            password = config.resolved_password()
            self.client.username_pw_set(config.username, password.reveal() if password is not None else None)
        context = tls_context(config.tls)
        if context is not None:
            self.client.tls_set_context(context)

    def _connect_blocking(self) -> None:
        config = self._config
        properties = None
        if config.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = int(config.session_expiry) if config.session == "persistent" else 0
        self.client.connect(
            self.broker.host,
            self.broker.port,
            keepalive=round(config.keepalive),
            clean_start=config.session == "clean" if config.protocol == "5" else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )

    async def open(self) -> bool:
        """Connect and wait for CONNACK; returns whether the broker still had our session."""
        where = str(self.broker)
        try:
            await self._loop.run_in_executor(None, self._prepare_blocking)
        except SecretFileError as exc:
            # retried like an unreachable broker: a file mid-rotation is back at the next attempt
            raise DeviceUnavailable(f"cannot read the password for {where}: {exc}") from exc
        except (OSError, ssl.SSLError, ValueError) as exc:
            files = ", ".join(str(p) for p in self._config.tls.files() if p is not None) if self._config.tls else ""
            raise DeviceRejected(f"cannot load the TLS files for {where} ({files}): {exc}") from exc
        try:
            await asyncio.wait_for(
                self._loop.run_in_executor(None, self._connect_blocking), self._config.connect_timeout + 1
            )
        except TimeoutError:
            raise DeviceUnavailable(f"connect to {where} timed out") from None
        except ssl.SSLError as exc:
            raise DeviceRejected(f"TLS handshake with {where} failed: {exc.reason or exc}") from exc
        except OSError as exc:
            raise DeviceUnavailable(f"cannot connect to {where}: {exc.strerror or exc}") from exc
        self._register_socket()
        try:
            return await asyncio.wait_for(asyncio.shield(self._connack), self._config.connect_timeout)
        except TimeoutError:
            raise DeviceUnavailable(f"no CONNACK from {where} within {self._config.connect_timeout}s") from None

    async def subscribe(self, subscriptions: Sequence[tuple[str, int]]) -> None:
        """Subscribe to every ``(filter, qos)``; a refused filter is DeviceRejected (e.g. not allowed by the ACL)."""
        if self._config.protocol == "5":
            request: list[tuple[str, Any]] = [(topic, SubscribeOptions(qos=qos)) for topic, qos in subscriptions]
        else:
            request = list(subscriptions)
        result, mid = self.client.subscribe(request)
        if result != paho.MQTT_ERR_SUCCESS or mid is None:
            raise DeviceUnavailable(f"subscribe failed: {paho.error_string(result)}")
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        self._pending_subacks[mid] = future
        try:
            reasons = await asyncio.wait_for(future, self._config.connect_timeout)
        except TimeoutError:
            raise DeviceUnavailable("no SUBACK within the connect timeout") from None
        refused = [topic for (topic, _), reason in zip(subscriptions, reasons, strict=False) if reason.is_failure]
        if refused:
            raise DeviceRejected(f"broker refused subscriptions {refused}")

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, wait_s: float) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise DeviceUnavailable(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        if qos == 0 or info.is_published():
            return
        future: asyncio.Future[None] = self._loop.create_future()
        self._pending_pubacks[info.mid] = future
        try:
            await asyncio.wait_for(future, wait_s)
        except TimeoutError:
            self._pending_pubacks.pop(info.mid, None)
            raise DeviceUnavailable(f"no PUBACK for {topic!r} within {wait_s}s") from None

    def ack(self, mid: int, qos: int) -> None:
        self.client.ack(mid, qos)

    def tick(self) -> None:
        """Keepalive: send PINGREQ when due; close a session whose ping went unanswered (paho's check)."""
        if self._sock is not None:
            self.client.loop_misc()
            if self._sock is None:  # loop_misc closed the socket without a disconnect callback
                self._end("no traffic and no ping response within the keepalive (stuck connection)")

    @property
    def connected(self) -> bool:
        return self._sock is not None and self._connack.done() and not self.closed.done()

    async def close(self) -> None:
        """Send DISCONNECT (when still connected) and release the socket."""
        if self._sock is not None:
            if self._connack.done() and not self.closed.done():
                self.client.disconnect()
                # give the DISCONNECT (and any acks queued before it) one chance to be written
                if self.client.want_write():
                    self.client.loop_write()
            if self._sock is not None:
                # paho has no public close outside its own network loop
                self.client._sock_close()
        self._end("closed")
        if not self._connack.done():
            self._connack.cancel()
        # a CONNACK failure nobody awaited must not be reported as "exception never retrieved"
        if self._connack.done() and not self._connack.cancelled():
            self._connack.exception()
