"""The connection's read path: the QoS 0 fast path agrees with paho's own PUBLISH decoding byte for byte, leaves
every other packet (and every malformed or incomplete one) to paho, and a real socket stream mixing QoS 0 and QoS 1,
split at arbitrary points, reaches the two callbacks complete and in order, also across a pause with data still
buffered in user space."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion, _ConnectionState

from drivers.mqtt.client import MqttConnection, parse_qos0_publish
from drivers.mqtt.config import MqttSourceConfig


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def publish_body(
    topic: bytes, payload: bytes, *, qos: int = 0, mid: int = 1, v5: bool = False, props: bytes = b""
) -> bytes:
    """A PUBLISH packet after its fixed header (what paho's ``decode_publish`` takes)."""
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    if v5:
        body += _varint(len(props)) + props
    return body + payload


def publish_packet(
    topic: bytes, payload: bytes, *, qos: int = 0, mid: int = 1, v5: bool = False, props: bytes = b"", flags: int = 0
) -> bytes:
    body = publish_body(topic, payload, qos=qos, mid=mid, v5=v5, props=props)
    return bytes([0x30 | qos << 1 | flags]) + _varint(len(body)) + body


# a user property ("k" = "v") and a content type: both skipped by the fast path
V5_PROPS = b"\x26\x00\x01k\x00\x01v" + b"\x03\x00\x10application/json"


@given(
    topic=st.binary(min_size=1, max_size=300),
    payload=st.binary(max_size=20_000),
    v5=st.booleans(),
    with_props=st.booleans(),
    flags=st.sampled_from([0, 1, 8, 9]),  # RETAIN and DUP do not matter to a subscriber's samples
)
def test_fast_path_decodes_like_paho(topic: bytes, payload: bytes, v5: bool, with_props: bool, flags: int) -> None:
    props = V5_PROPS if with_props and v5 else b""
    packet = publish_packet(topic, payload, v5=v5, props=props, flags=flags)
    prefix = b"\xd0\x00"  # a PINGRESP before it: parsing starts at an offset
    trailer = b"\x30\x05"  # and the start of the next packet after it
    parsed = parse_qos0_publish(prefix + packet + trailer, len(prefix), v5)
    protocol = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
    reference = _packet.decode_publish(packet[0], publish_body(topic, payload, v5=v5, props=props), protocol)
    assert parsed == (len(prefix) + len(packet), reference.topic, reference.payload)


def test_fast_path_decodes_a_multi_byte_length() -> None:
    packet = publish_packet(b"t/x", b"7" * 20_000)  # remaining length needs 3 bytes
    assert parse_qos0_publish(packet, 0, False) == (len(packet), b"t/x", b"7" * 20_000)


@pytest.mark.parametrize(
    ("case", "data", "v5"),
    [
        ("QoS 1 (acknowledged by paho)", publish_packet(b"t", b"1", qos=1), False),
        ("QoS 2", publish_packet(b"t", b"1", qos=2), False),
        ("nothing left", b"", False),
        ("PINGRESP", b"\xd0\x00", False),
        ("CONNACK", b"\x20\x02\x00\x00", False),
        ("SUBACK", b"\x90\x03\x00\x01\x00", False),
        ("empty topic (v3: paho reports the protocol error)", publish_packet(b"", b"1"), False),
        ("empty topic (v5: topic alias)", publish_packet(b"", b"1", v5=True, props=b"\x23\x00\x01"), True),
        ("topic longer than the packet", b"\x30\x03\x00\x09a", False),
        ("body shorter than a topic length", b"\x30\x01\x00", False),
        ("remaining length over 4 bytes", b"\x30\xff\xff\xff\xff\x01" + b"\x00" * 10, False),
        ("v5 properties longer than the packet", b"\x30\x05\x00\x01t\x09x", True),
        ("v5 properties length missing", b"\x30\x03\x00\x01t", True),
    ],
)
def test_everything_else_is_left_to_paho(case: str, data: bytes, v5: bool) -> None:
    assert parse_qos0_publish(data, 0, v5) is None, case


def test_an_incomplete_packet_is_left_for_the_next_read() -> None:
    packet = publish_packet(b"zigbee2mqtt/kitchen", b'{"temperature":21.5}' * 10)
    for cut in range(len(packet)):
        assert parse_qos0_publish(packet[:cut] or b"\x30", 0, False) is None, cut


# --- through a real socket ------------------------------------------------------------------------------------


class _Harness:
    """A connection whose paho client is attached to one end of a socket pair (no broker, no CONNECT)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        config = MqttSourceConfig.model_validate(
            {
                "id": "t",
                "host": "127.0.0.1",
                "subscriptions": [{"id": "s", "topic": "t/+", "decoder": {"type": "json"}}],
            }
        )
        self.received: list[tuple[str, bytes, int]] = []
        self.pause_after: int | None = None
        self.connection = MqttConnection(config, on_message=self._slow, on_publish=self._fast, loop=loop)
        self.ours, self.broker = socket.socketpair()
        self.ours.setblocking(False)
        client = self.connection.client
        client._sock = self.ours
        client._state = _ConnectionState.MQTT_CS_CONNECTED
        self.connection._register_socket()

    def _fast(self, topic: bytes, payload: bytes, received_ns: int) -> None:
        assert received_ns > 0
        self.received.append((topic.decode(), payload, 0))
        if self.pause_after is not None and len(self.received) >= self.pause_after:
            self.connection.pause_reading()

    def _slow(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        self.received.append((message.topic, bytes(message.payload), message.qos))

    def close(self) -> None:
        if self.connection._sock is not None:  # not already closed by paho (end of stream)
            self.connection._on_socket_close(self.connection.client, None, self.ours)
        self.ours.close()
        self.broker.close()


async def _until(predicate: Any, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


@given(cuts=st.lists(st.integers(min_value=1, max_value=5_000), max_size=8))
def test_a_mixed_stream_split_anywhere_arrives_complete_and_in_order(cuts: list[int]) -> None:
    expected = []
    stream = b""
    for n in range(300):
        qos = 1 if n % 7 == 3 else 0
        topic, payload = f"t/dev{n % 5}", f'{{"n":{n}}}'.encode()
        stream += publish_packet(topic.encode(), payload, qos=qos, mid=n + 1)
        if n % 50 == 10:
            stream += b"\xd0\x00"  # a PINGRESP among them
        expected.append((topic, payload, qos))

    async def scenario() -> None:
        harness = _Harness(asyncio.get_running_loop())
        try:
            pieces, start = [], 0
            for cut in [*sorted(cuts), len(stream)]:
                if cut > start:
                    pieces.append(stream[start:cut])
                    start = cut
            for piece in pieces:
                harness.broker.sendall(piece)
                await asyncio.sleep(0)
            await _until(lambda: len(harness.received) >= len(expected), "all messages")
            assert harness.received == expected
        finally:
            harness.close()

    asyncio.run(scenario())


async def test_a_pause_with_messages_still_buffered_resumes_them() -> None:
    harness = _Harness(asyncio.get_running_loop())
    try:
        # 100 small messages arrive in one read; the handler pauses after 10 (a full batch)
        harness.pause_after = 10
        harness.broker.sendall(b"".join(publish_packet(b"t/a", str(n).encode()) for n in range(100)))
        await _until(lambda: len(harness.received) >= 10, "the first batch")
        await asyncio.sleep(0.01)
        assert len(harness.received) == 10  # paused: nothing more is dispatched
        assert harness.connection.client.has_buffered()
        harness.pause_after = None
        # nothing new arrives on the socket: only the resume can bring the buffered 90 in
        harness.connection.resume_reading()
        await _until(lambda: len(harness.received) == 100, "the buffered rest")
        assert [payload for _, payload, _ in harness.received] == [str(n).encode() for n in range(100)]
    finally:
        harness.close()


async def test_the_end_of_the_stream_is_still_a_lost_connection() -> None:
    harness = _Harness(asyncio.get_running_loop())
    disconnects: list[Any] = []
    harness.connection.client.on_disconnect = lambda *args: disconnects.append(args[3])
    try:
        harness.broker.sendall(publish_packet(b"t/a", b"1"))
        harness.broker.shutdown(socket.SHUT_WR)
        await _until(lambda: bool(disconnects), "the disconnect")
        assert harness.received == [("t/a", b"1", 0)]
    finally:
        harness.close()
