"""Discovery's recognisers on payloads alone: names become identifiers, hostile traffic never raises, and what is
not recognised is listed rather than guessed at."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.mqtt.discover import MAX_TOPICS, Discovery, ident
from gateway.cli import main
from gateway.model import is_ident


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Living Room", "living_room"),
        ("floor1/kitchen/motion", "floor1_kitchen_motion"),
        ("70b3", "dev_70b3"),
        ("", "dev"),
    ],
)
def test_names_become_identifiers(name: str, expected: str) -> None:
    assert ident(name, "dev") == expected


topics = st.sampled_from(
    [
        "zigbee2mqtt/bridge/devices",
        "zigbee2mqtt/x",
        "tele/a/SENSOR",
        "tele/a/STATE",
        "a/events/rpc",
        "a/status/switch:0",
        "v3/a@t/devices/d/up",
        "lora/x/up",
        "a/online",
        "x",
    ]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    messages=st.lists(
        st.tuples(topics, json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=50)), max_size=8
    )
)
def test_no_traffic_makes_discovery_raise_and_every_output_is_identifiers(messages: list[tuple[str, bytes]]) -> None:
    discovery = Discovery()
    for topic, payload in messages:
        discovery.feed(topic, payload)
    text = discovery.site_yaml(host="h", port=1)
    assert text.startswith("# Written by")
    for found in discovery.devices.values():
        assert all(is_ident(name) for name in found.points)


def test_unrecognised_traffic_is_listed_and_topics_are_bounded() -> None:
    discovery = Discovery()
    for i in range(MAX_TOPICS + 5):
        discovery.feed(f"noise/{i}", b"hello")
    assert discovery.messages == MAX_TOPICS + 5
    assert "devices: []" in discovery.site_yaml(host="h", port=1)
    assert discovery.unrecognised == {"noise/...": MAX_TOPICS}


def test_a_zigbee2mqtt_state_seen_before_bridge_devices_is_recognised_at_the_end() -> None:
    discovery = Discovery()
    discovery.feed("zigbee2mqtt/Lamp", b'{"state": "ON", "brightness": 120, "linkquality": 80}')
    discovery.feed("zigbee2mqtt/bridge/devices", b'[{"friendly_name": "Lamp", "type": "Router"}]')
    text = discovery.site_yaml(host="h", port=1)
    assert discovery.unrecognised == {}
    points = discovery.devices[("z2m", "Lamp")].points
    assert {name: (p.kind, p.path) for name, p in points.items()} == {
        "state": ("bool", "$.state"),
        "brightness": ("float", "$.brightness"),
    }
    assert 'topic_name: "Lamp"' in text


def test_discover_exits_3_when_the_broker_cannot_be_reached(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.services import free_port

    port = free_port()  # nothing listens there
    assert main(["mqtt", "discover", "--broker", f"127.0.0.1:{port}", "--seconds", "1"]) == 3
    assert f"cannot reach the broker at 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["a/#/b", "a+/b", ""])
def test_discover_refuses_a_bad_topic_filter_as_a_usage_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["mqtt", "discover", "--broker", "127.0.0.1:1883", "--topic", bad])
    assert stopped.value.code == 2
    assert "--topic" in capsys.readouterr().err
