"""Broker lists in the one MQTT connection model (gateway/mqtt_connection.py): the ``brokers:`` key on both sides,
its errors at load, and the round robin with its backoff rule (``BrokerRotation``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.mqtt.config import MqttSourceConfig
from gateway.config.site import load_site
from gateway.errors import ConfigError
from gateway.mqtt_connection import BrokerAddress, BrokerRotation, parse_broker
from gateway.uplinks.config import PlatformConfig


def load_both(tmp_path: Path, connection: str) -> tuple[MqttSourceConfig, PlatformConfig]:
    """The same connection keys on an ``mqtt_sources:`` entry and on ``uplinks.platform``."""
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\n"
        "gateway: {id: gw1, site: lab}\n"
        "http: {enabled: false}\n"
        "mqtt_sources:\n"
        f"  - {{id: building, {connection},\n"
        "      subscriptions: [{id: z2m, topic: 'zigbee2mqtt/+', decoder: {type: zigbee2mqtt}}]}\n"
        "devices:\n"
        "  - {id: lobby, driver: mqtt, source: building, points: {temperature: {unit: degC}}}\n"
        "uplinks:\n"
        f"  platform: {{{connection}}}\n"
    )
    loaded = load_site(site)
    (source,) = loaded.config.section("mqtt_sources", MqttSourceConfig)
    platform = loaded.config.uplinks.configured("platform")
    assert isinstance(platform, PlatformConfig)
    return source, platform


def test_a_broker_list_is_read_the_same_on_both_sides(tmp_path: Path) -> None:
    source, platform = load_both(tmp_path, "brokers: ['10.0.0.1:1884', 'mqtt://node2', 'node3']")
    expected = (BrokerAddress("10.0.0.1", 1884), BrokerAddress("node2", 1883), BrokerAddress("node3", 1883))
    assert source.broker_list() == platform.broker_list() == expected
    assert source.broker() == platform.broker() == expected[0]


def test_host_and_port_still_mean_a_list_of_one(tmp_path: Path) -> None:
    source, platform = load_both(tmp_path, "host: 127.0.0.1, port: 1999")
    assert source.broker_list() == platform.broker_list() == (BrokerAddress("127.0.0.1", 1999),)
    rotation = platform.rotation()
    assert rotation.failed() is False  # one broker: never moves, always backs off
    assert rotation.current == BrokerAddress("127.0.0.1", 1999) and rotation.failovers == 0


def test_tls_changes_the_default_port_of_entries_without_one(tmp_path: Path) -> None:
    source, _ = load_both(tmp_path, "brokers: ['a', 'mqtts://b', 'c:9000'], tls: {}")
    assert source.broker_list() == (BrokerAddress("a", 8883), BrokerAddress("b", 8883), BrokerAddress("c", 9000))


@pytest.mark.parametrize(
    ("connection", "message"),
    [
        ("host: a, brokers: ['b:1883']", "give either host/port or brokers, not both"),
        ("port: 1883, brokers: ['b:1883']", "give either host/port or brokers, not both"),
        ("brokers: []", "brokers is empty"),
        ("port: 1883", "give the broker: host (and port), or brokers"),
        ("brokers: ['a:1883', '']", "brokers[1]: an empty broker entry"),
        ("brokers: ['a:http']", "the port must be a number from 1 to 65535"),
        ("brokers: ['a:0']", "the port must be a number from 1 to 65535"),
        ("brokers: ['a:70000']", "the port must be a number from 1 to 65535"),
        ("brokers: ['a:']", "the port after ':' is missing"),
        ("brokers: ['http://a:80']", "unknown scheme 'http'"),
        ("brokers: ['mqtt://user:pw@a:1883']", "scheme://host:port only"),
        ("brokers: ['mqtts://a:8883']", "is an mqtts:// URL but there is no tls: section"),
        ("brokers: ['a:1883', 'a:1883']", "brokers[1]: a:1883 is listed twice"),
        ("brokers: ['fe80::1']", "an IPv6 address is written [address]:port"),
    ],
)
def test_bad_broker_lists_are_refused_at_load_on_both_sides(tmp_path: Path, connection: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_both(tmp_path, connection)
    text = str(caught.value)
    assert "mqtt_sources.0" in text and "uplinks.platform" in text, text
    assert text.count(message) == 2, text


def test_a_plain_url_with_tls_configured_is_refused() -> None:
    with pytest.raises(ValueError, match="plain mqtt:// URL but tls: is configured"):
        PlatformConfig.model_validate({"brokers": ["mqtt://a"], "tls": {}})


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("a", (BrokerAddress("a", 1883), None)),
        ("a:1999", (BrokerAddress("a", 1999), None)),
        ("mqtt://a", (BrokerAddress("a", 1883), False)),
        ("tcp://a:2000/", (BrokerAddress("a", 2000), False)),
        ("mqtts://a", (BrokerAddress("a", 8883), True)),
        ("[::1]:1884", (BrokerAddress("::1", 1884), None)),
        ("[::1]", (BrokerAddress("::1", 1883), None)),
    ],
)
def test_broker_entries_parse(entry: str, expected: tuple[BrokerAddress, bool | None]) -> None:
    assert parse_broker(entry, default_port=1883) == expected


def test_round_robin_is_immediate_until_every_broker_failed_in_a_row_then_backs_off() -> None:
    a, b, c = BrokerAddress("a", 1), BrokerAddress("b", 2), BrokerAddress("c", 3)
    rotation = BrokerRotation((a, b, c))
    assert rotation.current == a
    # a whole cluster away: two immediate moves, then the third (back to the first) waits the backoff
    assert [rotation.failed() for _ in range(3)] == [True, True, False]
    assert rotation.current == a and rotation.failovers == 3
    # the next round is the same: every broker tried once per backoff delay, never a tight loop
    assert [rotation.failed() for _ in range(3)] == [True, True, False]
    assert rotation.failovers == 6


def test_brokers_that_accept_and_drop_every_connection_still_back_off() -> None:
    """Success does not reset the count of moves: two flapping brokers are not reconnected to in a tight loop."""
    rotation = BrokerRotation((BrokerAddress("a", 1), BrokerAddress("b", 2)))
    immediate = [rotation.failed() for _ in range(6)]  # each a session that was up, then lost
    assert immediate == [True, False, True, False, True, False]
    assert rotation.current == BrokerAddress("a", 1)


def test_a_rotation_needs_a_broker() -> None:
    with pytest.raises(ValueError, match="at least one broker"):
        BrokerRotation(())
