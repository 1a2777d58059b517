"""Both MQTT clients (the sensor source and the platform uplink) with the one connection model, against a real
Mosquitto that requires TLS, a client certificate and a password: the same ``tls:`` keys get both in, and a password
file rotated while the gateway runs is used by the next connect without a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from drivers.mqtt.config import MqttSourceConfig
from drivers.mqtt.source import MqttSource
from gateway.config.site import load_site
from gateway.outbox import Outbox
from gateway.uplinks.runner import build_uplinks
from tests.integration.mqtt.test_mqtt_broker import LIVING, Collector, running, wait_until
from tests.integration.uplinks.common import FAST_DELIVERY, CommandRecorder, readings
from tests.integration.uplinks.test_platform_tls import TlsMosquitto

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_broker() -> object:
    broker = TlsMosquitto()
    broker.start()
    yield broker
    broker.close()


def write_site(tmp_path: Path, broker: TlsMosquitto) -> Path:
    """One site: an MQTT source and the platform uplink on the same broker, with the same connection keys."""
    pki = broker.dir
    connection = (
        f"host: 127.0.0.1, port: {broker.port}, username: gw1, password_file: mqtt.password,"
        f" tls: {{ca_file: '{pki / 'ca.pem'}', cert_file: '{pki / 'client.pem'}', key_file: '{pki / 'client.key'}'}}"
    )
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\n"
        "gateway: {id: gw1, site: tower}\n"
        "http: {enabled: false}\n"
        "mqtt_sources:\n"
        f"  - {{id: building, {connection}, reconnect_min: 50ms, reconnect_max: 200ms,\n"
        "      subscriptions: [{id: z2m, topic: 'zigbee2mqtt/+', qos: 1, decoder: {type: zigbee2mqtt}}]}\n"
        "devices:\n"
        "  - {id: living_room, driver: mqtt, source: building, topic_name: Living Room,\n"
        "     points: {temperature: {unit: degC}}}\n"
        "uplinks:\n"
        f"  platform: {{{connection}, prefix: tls, client_id: gw1-platform, delivery: {FAST_DELIVERY}}}\n"
    )
    return site


async def test_a_rotated_password_file_is_used_at_the_next_connect_by_both_sides(
    tmp_path: Path, tls_broker: TlsMosquitto
) -> None:
    secret = tmp_path / "mqtt.password"
    secret.write_text("the-old-one\n")  # the broker already expects the new password
    site = load_site(write_site(tmp_path, tls_broker))
    (config,) = site.config.section("mqtt_sources", MqttSourceConfig)

    source = MqttSource(config, [LIVING])
    outbox = Outbox(tmp_path / "outbox.db")
    await outbox.append(readings(0, 3))
    (runner,) = build_uplinks(site, outbox, commands=CommandRecorder())  # type: ignore[arg-type]
    stopping = asyncio.Event()
    async with running(source, Collector()), asyncio.TaskGroup() as tg:
        tg.create_task(runner.run(stopping))
        # both refused with the old password, both retrying (not stopped)
        await wait_until(lambda: "not authorized" in str(source.last_error).lower(), what="sensor side refused")
        await wait_until(lambda: runner.status()["requests_failed"] >= 2, what="uplink refused")
        assert source.connects == 0
        assert runner.status()["sent_samples"] == 0

        secret.write_text("pa55-w0rd\n")  # rotated on disk, no restart
        await wait_until(lambda: source.connected, what="sensor side connected with the rotated password")
        await wait_until(lambda: runner.status()["sent_samples"] == 6, what="uplink delivered after the rotation")
        stopping.set()
    assert source.connects >= 1
    assert runner.status()["backlog_samples"] == 0
    await outbox.close()


async def test_a_password_file_missing_at_a_connect_is_retried_not_fatal(
    tmp_path: Path, tls_broker: TlsMosquitto
) -> None:
    secret = tmp_path / "mqtt.password"
    secret.write_text("pa55-w0rd\n")
    site = load_site(write_site(tmp_path, tls_broker))
    (config,) = site.config.section("mqtt_sources", MqttSourceConfig)
    secret.unlink()  # removed after load (a rotation that deletes, then writes)
    source = MqttSource(config, [LIVING])
    async with running(source, Collector()) as task:
        await wait_until(lambda: "cannot read the password" in str(source.last_error), what="failed connect")
        assert not task.done()  # the source keeps retrying
        secret.write_text("pa55-w0rd\n")
        await wait_until(lambda: source.connected, what="connected once the file is back")
