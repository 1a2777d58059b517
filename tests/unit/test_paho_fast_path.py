"""paho-mqtt's private internals that the MQTT driver's QoS 0 fast path relies on are still there and still behave.

The fast path (``drivers/mqtt/client.py``: ``_BufferedClient`` and ``MqttConnection._on_readable`` /
``_dispatch_buffered`` / ``close``) serves paho's socket reads from one 64 KiB ``recv`` and slices complete QoS 0
PUBLISH packets out of that buffer between two of paho's packets. It overrides ``Client._sock_recv``, reads
``Client._in_packet["command"]`` and writes ``Client._last_bytes_received`` (paho's keepalive clock, stamped with
``paho.mqtt.client.time_func``), and closes the socket with ``Client._sock_close()``. Its tests
(``tests/unit/mqtt/test_mqtt_read_path.py``) compare it with ``paho.mqtt._packet.decode_publish`` and drive the
client through ``paho.mqtt.enums._ConnectionState``. None of these is public API, so pyproject pins paho-mqtt to the
minor release the fast path was written against; this test fails, naming the fast path and what changed, when a
paho release moves any of them.
"""

from __future__ import annotations

import inspect
import socket
import tomllib
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from paho.mqtt.enums import CallbackAPIVersion

from drivers.mqtt.client import _BufferedClient, parse_qos0_publish

REPO = Path(__file__).resolve().parents[2]
#: the paho-mqtt minor release the fast path was written and verified against
WRITTEN_AGAINST = "2.2"
USER = "drivers/mqtt/client.py (the MQTT driver's QoS 0 fast path: _BufferedClient, MqttConnection._on_readable)"

PINGRESP = b"\xd0\x00"
QOS0_PUBLISH = b"\x30\x09\x00\x03t/a" + b"21.5"  # remaining length 9: topic length, topic "t/a", payload "21.5"


def changed(what: str) -> str:
    return (
        f"paho-mqtt {version('paho-mqtt')} changed {what}, which {USER} relies on. Re-read paho's Client._packet_read, "
        f"_sock_recv and _sock_close, fix the fast path, then move the paho-mqtt pin in pyproject.toml and "
        f"WRITTEN_AGAINST in {Path(__file__).name}."
    )


def parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_pyproject_pins_paho_to_the_minor_the_fast_path_was_written_against() -> None:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = [Requirement(text) for text in dependencies if Requirement(text).name == "paho-mqtt"]
    assert len(pins) == 1, f"pyproject.toml must name paho-mqtt once: {dependencies}"
    specifier = pins[0].specifier
    major, minor = (int(part) for part in WRITTEN_AGAINST.split("."))
    allowed = [f"{major}.{minor}.0", f"{major}.{minor}.9"]
    refused = [f"{major}.{minor - 1}.0", f"{major}.{minor + 1}.0", f"{major + 1}.0.0"]
    assert all(specifier.contains(v) for v in allowed), f"the pin {specifier} refuses {WRITTEN_AGAINST}.x ({USER})"
    assert not any(specifier.contains(v) for v in refused), (
        f"the pin {specifier} allows another paho-mqtt minor than {WRITTEN_AGAINST}, which {USER} was not checked "
        f"against: keep it to {WRITTEN_AGAINST}.x"
    )


def test_the_installed_paho_is_the_minor_the_fast_path_was_written_against() -> None:
    installed = Version(version("paho-mqtt"))
    assert f"{installed.major}.{installed.minor}" == WRITTEN_AGAINST, changed(f"its version to {installed}")


def test_the_private_members_exist_with_the_signatures_the_fast_path_calls() -> None:
    assert callable(getattr(paho.Client, "_sock_recv", None)), changed("Client._sock_recv (gone)")
    assert parameters(paho.Client._sock_recv) == ["self", "bufsize"], changed("Client._sock_recv's signature")
    assert callable(getattr(paho.Client, "_sock_close", None)), changed("Client._sock_close (gone)")
    assert parameters(paho.Client._sock_close) == ["self"], changed("Client._sock_close's signature")
    assert parameters(paho.Client.loop_read) == ["self", "max_packets"], changed("Client.loop_read's signature")
    assert callable(getattr(paho, "time_func", None)), changed("paho.mqtt.client.time_func (gone)")
    assert isinstance(paho.time_func(), float), changed("paho.mqtt.client.time_func (no longer returns seconds)")

    client = paho.Client(CallbackAPIVersion.VERSION2)
    in_packet = getattr(client, "_in_packet", None)
    assert isinstance(in_packet, dict), changed("Client._in_packet (no longer a dict)")
    assert in_packet.get("command") == 0, changed("Client._in_packet['command'] (not 0 between packets)")
    assert isinstance(getattr(client, "_last_bytes_received", None), float), changed("Client._last_bytes_received")


def test_the_private_members_the_fast_path_tests_use_exist() -> None:
    from paho.mqtt import _packet, enums

    uses = "tests/unit/mqtt/test_mqtt_read_path.py (the fast path's reference and harness)"
    assert callable(getattr(_packet, "decode_publish", None)), changed(
        f"paho.mqtt._packet.decode_publish, used by {uses}"
    )
    assert parameters(_packet.decode_publish) == ["header", "packet", "protocol"], changed(
        f"paho.mqtt._packet.decode_publish's signature, used by {uses}"
    )
    states = getattr(enums, "_ConnectionState", None)
    assert states is not None and hasattr(states, "MQTT_CS_CONNECTED"), changed(
        f"paho.mqtt.enums._ConnectionState, used by {uses}"
    )


@pytest.fixture
def wired() -> Iterator[tuple[_BufferedClient, socket.socket]]:
    """The fast path's client on one end of a socket pair, the test playing the broker on the other."""
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client = _BufferedClient(CallbackAPIVersion.VERSION2)
    client._sock = ours
    try:
        yield client, broker
    finally:
        client._sock_close()
        broker.close()


def test_paho_reads_packets_through_sock_recv_and_resets_in_packet_between_them(
    wired: tuple[_BufferedClient, socket.socket],
) -> None:
    """What ``_on_readable`` assumes of ``loop_read``: paho takes its bytes only from ``_sock_recv`` (so one large
    read serves several packets), handles one packet, leaves ``_in_packet["command"]`` at 0 after it and stamps
    ``_last_bytes_received``; the rest stays in the buffer for the fast path."""
    client, broker = wired
    broker.sendall(PINGRESP + QOS0_PUBLISH)
    client._last_bytes_received = 0.0

    assert client.loop_read() == paho.MQTT_ERR_SUCCESS, changed("Client.loop_read's result for a PINGRESP")
    assert client.read_pos == len(PINGRESP), changed("how Client._packet_read reads (not through _sock_recv)")
    assert client._in_packet["command"] == 0, changed("Client._in_packet after a packet (not reset to command 0)")
    assert client._last_bytes_received > 0.0, changed("Client._last_bytes_received (not stamped on a read)")
    assert client.has_buffered()
    assert parse_qos0_publish(client.read_buffer, client.read_pos, False) == (
        len(PINGRESP + QOS0_PUBLISH),
        b"t/a",
        b"21.5",
    )


def test_paho_reports_nothing_to_read_as_success_without_progress(wired: tuple[_BufferedClient, socket.socket]) -> None:
    """``_on_readable`` stops its read burst when a ``loop_read`` made no progress; that needs paho to return success
    (not an error that would end the session) when the socket has nothing yet."""
    client, _ = wired
    before = client._in_packet["command"], client.read_pos, client.read_buffer
    assert client.loop_read() == paho.MQTT_ERR_SUCCESS, changed("Client.loop_read on an empty non-blocking socket")
    assert (client._in_packet["command"], client.read_pos, client.read_buffer) == before


def test_sock_close_closes_the_socket_and_tells_the_callback(wired: tuple[_BufferedClient, socket.socket]) -> None:
    """``MqttConnection.close`` relies on ``_sock_close`` to close the socket and call ``on_socket_close`` (which
    removes the loop's reader), as paho has no public close outside its own network loop."""
    client, _ = wired
    sock = client._sock
    assert isinstance(sock, socket.socket)
    closed: list[object] = []
    client.on_socket_close = lambda _client, _userdata, s: closed.append(s)
    client._sock_close()
    assert client._sock is None, changed("Client._sock_close (the client still holds its socket)")
    assert closed == [sock], changed("Client._sock_close (on_socket_close not called with the socket)")
    assert sock.fileno() == -1, changed("Client._sock_close (the socket is left open)")
