"""The platform uplink's paho writes go out corked: every packet of a write turn in one transmission (issue 19)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from gateway.uplinks.mqtt import _cork_writes

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="TCP_CORK is Linux only")


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        try:
            yield client, peer
        finally:
            client.close()
            peer.close()


def corked(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)


def test_loop_write_runs_corked_and_leaves_the_socket_uncorked(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    sock, peer = tcp_pair
    paho = mqtt.Client(CallbackAPIVersion.VERSION2)
    paho._sock = sock  # a connected client's socket, without a broker
    seen: list[int] = []

    def write_turn() -> MQTTErrorCode:  # stands in for paho's: records the cork state while it "sends"
        seen.append(corked(sock))
        sock.sendall(b"\x30\x03\x00\x01a" * 3)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    paho.loop_write = write_turn  # type: ignore[method-assign]
    _cork_writes(paho)
    assert paho.loop_write() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert seen == [1]  # corked while paho writes
    assert corked(sock) == 0  # and uncorked after: the batch is transmitted now, not after the kernel's 200 ms
    peer.settimeout(2)
    assert peer.recv(64) == b"\x30\x03\x00\x01a" * 3


def test_without_a_socket_the_write_turn_is_paho_s_own() -> None:
    paho = mqtt.Client(CallbackAPIVersion.VERSION2)
    _cork_writes(paho)
    assert paho.loop_write() == MQTTErrorCode.MQTT_ERR_NO_CONN  # not connected: paho's answer, unchanged


def test_a_closed_socket_leaves_the_error_to_paho(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    sock, _peer = tcp_pair
    paho = mqtt.Client(CallbackAPIVersion.VERSION2)
    paho._sock = sock
    calls: list[str] = []

    def write_turn() -> MQTTErrorCode:
        calls.append("write")
        return MQTTErrorCode.MQTT_ERR_CONN_LOST

    paho.loop_write = write_turn  # type: ignore[method-assign]
    _cork_writes(paho)
    sock.close()  # setsockopt now fails with EBADF: no exception escapes, paho's write turn still runs
    assert paho.loop_write() == MQTTErrorCode.MQTT_ERR_CONN_LOST
    assert calls == ["write"]
