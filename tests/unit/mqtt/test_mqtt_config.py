"""MQTT config: what a site file may say, and the positioned errors for what it may not."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.mqtt.config import MqttSourceConfig, check_bindings
from drivers.mqtt.source import encode_command
from drivers.mqtt.topics import TopicTemplate, check_topic_filter
from gateway.config.site import load_site
from gateway.errors import ConfigError, WriteRejected

SITE = """version: 1
gateway: {{id: gw1, site: hq}}
mqtt_sources:
  - id: building
    host: broker.local
{source}
    subscriptions:
      - {{id: z2m, topic: "zigbee2mqtt/+", qos: 1, decoder: {{type: zigbee2mqtt}}}}
devices:
  - id: living_room
    driver: mqtt
    source: building
    topic_name: "Living Room"
    points:
{points}
"""


def site(tmp_path: Path, source: str = "", points: str = "      temperature: {unit: °C}") -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(SITE.format(source=source, points=points), encoding="utf-8")
    return path


def errors(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_site(path, env={})
    return str(info.value)


def test_a_valid_site_loads_with_registry_entries(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt.pass"
    secret.write_text("hunter2\n", encoding="utf-8")
    loaded = load_site(
        site(tmp_path, "    username: gw\n    password_file: mqtt.pass\n    session: persistent\n    client_id: gw1"),
        env={},
    )
    [source] = loaded.config.mqtt_sources
    assert source.resolved_password() is not None
    assert source.resolved_password().reveal() == "hunter2"  # type: ignore[union-attr]
    assert "hunter2" not in repr(source)
    assert loaded.registry["living_room.temperature"].unit == "°C"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("    colour: blue", "6:5 ... unknown key 'colour'"),
        ("    session: persistent", "needs a client_id"),
        ("    password: x", "a password needs a username"),
        ("    username: u\n    password_file: /nonexistent/secret", "cannot read secret file"),
        ("    username: u\n    password: ${MQTT_PASSWORD}", "environment variable MQTT_PASSWORD is not set"),
        ("    protocol: 4", "protocol"),
        ("    port: '1883'", "expected int"),
        ("    keepalive: 0s", "keepalive"),
        ("    max_payload: lots", "invalid size"),
    ],
)
def test_source_errors_are_positioned(tmp_path: Path, source: str, message: str) -> None:
    text = errors(site(tmp_path, source))
    assert text.startswith(str(tmp_path / "site.yaml") + ":")
    for part in message.split(" ... "):
        assert part in text


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ("      temperature: {path: temp}", "reads JSON paths like $.temp"),
        ("      temperature: {kind: bool, scale: 2}", "scale and offset apply to float points only"),
        ("      temperature: {path: '$..x'}", "invalid field path"),
        ("      temperature: {subscription: nope}", "no subscription 'nope' feeds this device"),
    ],
)
def test_point_errors(tmp_path: Path, points: str, message: str) -> None:
    path = site(tmp_path, points=points)
    try:
        loaded = load_site(path, env={})
    except ConfigError as exc:
        assert message in str(exc)
        return
    # cross-checks needing the whole site run when the sources are built
    devices = [d for d in loaded.config.devices if d.driver == "mqtt"]
    assert any(message in p for p in check_bindings(loaded.config.mqtt_sources, devices))  # type: ignore[arg-type]


def test_two_devices_claiming_one_topic_level_are_an_error() -> None:
    from drivers.mqtt.config import MqttDeviceConfig

    source = MqttSourceConfig.model_validate(
        {"id": "b", "host": "h", "subscriptions": [{"id": "z", "topic": "z/+", "decoder": {"type": "zigbee2mqtt"}}]}
    )
    a, b = (
        MqttDeviceConfig.model_validate(
            {"id": i, "driver": "mqtt", "source": "b", "topic_name": "Lamp", "points": {"x": {}}}
        )
        for i in ("a", "b")
    )
    assert check_bindings([source], [a, b]) == ["devices 'a' and 'b' both map topic level 'Lamp' of subscription 'z'"]


@pytest.mark.parametrize(
    ("template", "topic_filter", "topic", "expected"),
    [
        ("zigbee2mqtt/{device}", "zigbee2mqtt/+", "zigbee2mqtt/Living Room", ("Living Room", None)),
        ("tele/{device}/SENSOR", "tele/+/SENSOR", "tele/plug/SENSOR", ("plug", None)),
        ("tele/{device}/SENSOR", "tele/+/SENSOR", "tele/plug/STATE", None),
        ("shellies/{device}/relay/0/{field}", "shellies/+/relay/0/+", "shellies/s1/relay/0/power", ("s1", "power")),
        ("a/+/d/{device}/up", "a/+/d/+/up", "a/app1/d/eui1/up", ("eui1", None)),
        ("site/{device}/x", "site/#", "site/dev/x", ("dev", None)),
        ("site/{device}/x", "site/#", "site/dev/x/y", None),
    ],
)
def test_topic_templates(template: str, topic_filter: str, topic: str, expected: object) -> None:
    assert TopicTemplate(template, topic_filter).match(topic) == expected


@pytest.mark.parametrize(
    ("template", "topic_filter", "message"),
    [
        ("zigbee2mqtt/x", "zigbee2mqtt/+", "exactly one whole level {device}"),
        ("tele/{device}/STATE/x", "tele/+/STATE", "has 4 levels"),
        ("{device}/x", "tele/+", "must sit where the filter"),
        ("tele/{device}/{room}", "tele/+/+", "unknown placeholder"),
    ],
)
def test_bad_templates(template: str, topic_filter: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        TopicTemplate(template, topic_filter)
    assert message in str(info.value)


@pytest.mark.parametrize("bad", ["", "a/b#", "a/#/b", "a+/b", "a/\0"])
def test_bad_topic_filters(bad: str) -> None:
    with pytest.raises(ValueError, match=r"topic filter|must be"):
        check_topic_filter(bad)


def test_filter_with_two_wildcards_needs_a_template() -> None:
    with pytest.raises(ValueError, match="needs a template"):
        TopicTemplate.default_for("application/+/device/+/event/up")


def test_command_payloads_and_refusals() -> None:
    from drivers.mqtt.config import MqttPointSpec

    switch = MqttPointSpec.model_validate({"kind": "bool", "command": {"topic": "cmnd/plug/POWER"}})
    assert switch.command is not None
    assert encode_command(switch, switch.command, True, "p.on") == b"ON"
    level = MqttPointSpec.model_validate(
        {"kind": "int", "min": 0, "max": 254, "command": {"topic": "z/Lamp/set", "key": "brightness"}}
    )
    assert level.command is not None
    assert encode_command(level, level.command, 100.0, "p.level") == b'{"brightness":100}'
    with pytest.raises(WriteRejected, match="outside"):
        encode_command(level, level.command, 300, "p.level")
    with pytest.raises(WriteRejected, match="integer"):
        encode_command(level, level.command, 1.5, "p.level")
    with pytest.raises(ValueError, match="wildcards"):
        MqttPointSpec.model_validate({"command": {"topic": "cmnd/+/POWER"}})


def test_the_sample_site_in_the_driver_folder_loads() -> None:
    sample = Path(__file__).parents[3] / "drivers" / "mqtt" / "sample-site.yaml"
    loaded = load_site(sample, env={"MQTT_HOST": "broker.example", "MQTT_PASSWORD": "not-a-real-one"})
    devices = [d for d in loaded.config.devices if d.driver == "mqtt"]
    assert check_bindings(loaded.config.mqtt_sources, devices) == []  # type: ignore[arg-type]
    assert loaded.registry["plug_kitchen.relay_on"].writable
    assert len(loaded.registry) == 9
