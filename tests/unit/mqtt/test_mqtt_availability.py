"""Availability topics (Zigbee2MQTT, Tasmota LWT, Shelly ``online``, generic) and the per-device counters, driven
through the router without a broker: offline makes the device's points BAD and is never counted as malformed."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pydantic import ValidationError

from drivers.mqtt.config import MqttDeviceConfig, MqttSourceConfig, check_bindings
from drivers.mqtt.ingest import Ingest
from gateway.model import Quality, Sample

RECEIVED_NS = 1_750_000_000_123_456_789


def build(subscriptions: list[dict[str, Any]], availability: list[dict[str, Any]], **device: Any) -> Ingest:
    config = MqttSourceConfig.model_validate(
        {"id": "src", "host": "h", "subscriptions": subscriptions, "availability": availability}
    )
    dev = MqttDeviceConfig.model_validate(
        {"id": "dev", "driver": "mqtt", "source": "src", "points": {"t": {}, "h": {}}, **device}
    )
    return Ingest(config, [dev])


def run(ingest: Ingest, topic: str, payload: bytes) -> list[Sample]:
    out: list[Sample] = []
    ingest.ingest(topic, payload, RECEIVED_NS, out)
    return out


Z2M = [{"id": "z2m", "topic": "zigbee2mqtt/+", "decoder": {"type": "zigbee2mqtt"}}]
#: what an offline message makes of the device's points: BAD, no value, and why
BAD = [Sample(f"dev.{name}", None, RECEIVED_NS, Quality.BAD, "offline") for name in ("t", "h")]


@pytest.mark.parametrize(
    ("entry", "topic", "offline", "online"),
    [
        (
            {"topic": "zigbee2mqtt/+/availability", "format": "zigbee2mqtt"},
            "zigbee2mqtt/Lamp/availability",
            b'{"state":"offline"}',
            b'{"state":"online"}',
        ),
        (
            {"topic": "zigbee2mqtt/+/availability", "format": "zigbee2mqtt"},
            "zigbee2mqtt/Lamp/availability",
            b"offline",
            b"online",
        ),
        ({"topic": "tele/+/LWT", "format": "tasmota"}, "tele/Lamp/LWT", b"Offline", b"Online"),
        ({"topic": "+/online", "format": "shelly"}, "Lamp/online", b"false", b"true"),
        (
            {"topic": "devices/+/status", "online": "up", "offline": "down"},
            "devices/Lamp/status",
            b"down\n",
            b"up",
        ),
        ({"topic": "devices/+/avail"}, "devices/Lamp/avail", b"offline", b"online"),
    ],
)
def test_availability_formats_drive_state_and_bad_samples(
    entry: dict[str, Any], topic: str, offline: bytes, online: bytes
) -> None:
    ingest = build(Z2M, [entry], topic_name="Lamp")
    counters = ingest.counters["dev"]
    assert run(ingest, topic, online) == []
    assert counters.available is True
    assert run(ingest, topic, offline) == BAD
    assert counters.available is False
    assert counters.unavailable == 1
    assert counters.availability_topic == topic
    assert run(ingest, topic, online) == []
    assert counters.available is True
    # availability is never a data message: nothing malformed, nothing unmapped, no poll
    assert ingest.stats["z2m"].malformed == 0
    assert ingest.stats["z2m"].unmapped == 0
    assert counters.messages == 0
    assert counters.malformed == {}


def test_unrecognised_availability_payload_is_counted_not_malformed(caplog: pytest.LogCaptureFixture) -> None:
    ingest = build(Z2M, [{"topic": "tele/+/LWT", "format": "tasmota"}], topic_name="Lamp")
    with caplog.at_level(logging.WARNING, logger="drivers.mqtt"):
        assert run(ingest, "tele/Lamp/LWT", b"maybe") == []
    assert ingest.availability_unrecognised == 1
    assert ingest.counters["dev"].available is None
    assert ingest.stats["z2m"].malformed == 0
    assert any("neither Online nor Offline" in r.getMessage() for r in caplog.records)


def test_availability_of_an_unconfigured_device_is_not_malformed_or_unmapped() -> None:
    ingest = build(Z2M, [{"topic": "zigbee2mqtt/+/availability", "format": "zigbee2mqtt"}], topic_name="Lamp")
    assert run(ingest, "zigbee2mqtt/Other/availability", b"offline") == []
    assert ingest.availability_messages == 1
    assert ingest.stats["z2m"].malformed == 0
    assert ingest.counters["dev"].unavailable == 0


def test_z2m_availability_and_data_on_one_hash_filter_with_slash_names() -> None:
    subs = [
        {"id": "z2m", "topic": "zigbee2mqtt/#", "template": "zigbee2mqtt/{device}", "decoder": {"type": "zigbee2mqtt"}}
    ]
    avail = [{"topic": "zigbee2mqtt/#", "template": "zigbee2mqtt/{device}/availability", "format": "zigbee2mqtt"}]
    ingest = build(subs, avail, topic_name="floor1/kitchen/sensor")
    assert run(ingest, "zigbee2mqtt/floor1/kitchen/sensor", b'{"t": 21.5, "h": 40}') == [
        Sample("dev.t", 21.5, RECEIVED_NS),
        Sample("dev.h", 40.0, RECEIVED_NS),
    ]
    assert run(ingest, "zigbee2mqtt/floor1/kitchen/sensor/availability", b'{"state":"offline"}') == BAD
    assert run(ingest, "zigbee2mqtt/bridge/state", b'{"state":"online"}') == []
    assert ingest.stats["z2m"].malformed == 0
    assert ingest.stats["z2m"].unmapped == 1  # the bridge's own topic: no such device


def test_generic_availability_needs_distinct_payloads_and_fixed_formats_refuse_overrides() -> None:
    with pytest.raises(ValidationError, match="must differ"):
        MqttSourceConfig.model_validate(
            {
                "id": "s",
                "host": "h",
                "subscriptions": Z2M,
                "availability": [{"topic": "a/+", "online": "x", "offline": "x"}],
            }
        )
    with pytest.raises(ValidationError, match="fixed by the tasmota format"):
        MqttSourceConfig.model_validate(
            {
                "id": "s",
                "host": "h",
                "subscriptions": Z2M,
                "availability": [{"topic": "tele/+/LWT", "format": "tasmota", "online": "up"}],
            }
        )


def test_a_slash_name_needs_a_spanning_template() -> None:
    source = MqttSourceConfig.model_validate({"id": "src", "host": "h", "subscriptions": Z2M})
    device = MqttDeviceConfig.model_validate(
        {"id": "dev", "driver": "mqtt", "source": "src", "topic_name": "a/b", "points": {"t": {}}}
    )
    [problem] = check_bindings([source], [device])
    assert "zigbee2mqtt/#" in problem


# --- counters: a rejected message is not a good poll, undeclared fields are ignored and counted once -------------


def test_rejected_messages_are_counted_per_device_by_reason() -> None:
    ingest = build(Z2M, [], topic_name="Lamp", points={"t": {"min": -40, "max": 85}, "h": {}})
    run(ingest, "zigbee2mqtt/Lamp", b'{"t": 20, "h": 40}')
    run(ingest, "zigbee2mqtt/Lamp", b"{broken")
    run(ingest, "zigbee2mqtt/Lamp", b'{"t": "warm", "h": 40}')
    run(ingest, "zigbee2mqtt/Lamp", b'{"t": 999}')  # only refusals: nothing usable
    run(ingest, "zigbee2mqtt/Lamp", b'{"t": 999, "h": 41}')  # humidity usable: a good poll
    counters = ingest.counters["dev"]
    assert counters.as_dict() == {
        "messages": 5,
        "rejected": 3,
        "malformed": 1,
        "malformed_by_reason": {"json": 1},
        "refused": 3,
        "refused_by_reason": {"type": 1, "range": 2},
        "unavailable": 0,
        "undeclared": 0,
    }


def test_undeclared_boolean_does_not_drop_the_declared_values(caplog: pytest.LogCaptureFixture) -> None:
    ingest = build(Z2M, [], topic_name="Lamp")
    with caplog.at_level(logging.INFO, logger="drivers.mqtt"):
        for _ in range(3):
            samples = run(ingest, "zigbee2mqtt/Lamp", b'{"t": 20, "h": 40, "occupancy": true, "last_seen": 1}')
            assert [s.point for s in samples] == ["dev.t", "dev.h"]
    assert ingest.counters["dev"].undeclared == 1  # counted once, whatever the number of messages
    assert len([r for r in caplog.records if "occupancy" in r.getMessage()]) == 1


def test_senml_undeclared_boolean_record_with_boolean_base_value_keeps_the_declared_ones() -> None:
    subs = [{"id": "s", "topic": "s/+", "decoder": {"type": "senml"}}]
    ingest = build(subs, [], topic_name="x", points={"temp": {}})
    samples = run(ingest, "s/x", b'[{"n":"temp","v":1},{"n":"door","vb":true,"bv":true}]')
    assert [s.value for s in samples] == [1.0]
    assert ingest.counters["dev"].undeclared == 1
    assert ingest.stats["s"].malformed == 0


def test_unknown_device_is_logged_once_per_topic_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    ingest = build(Z2M, [], topic_name="Lamp")
    with caplog.at_level(logging.WARNING, logger="drivers.mqtt"):
        for _ in range(5):
            run(ingest, "zigbee2mqtt/Kitchen", b'{"t": 1}')
        run(ingest, "zigbee2mqtt/Hall", b'{"t": 1}')
    lines = [r.getMessage() for r in caplog.records if "no configured device" in r.getMessage()]
    assert len(lines) == 2
    assert "'Kitchen'" in lines[0] and "'Hall'" in lines[1]
    assert ingest.stats["z2m"].unmapped == 6


def test_availability_reaches_every_device_of_that_name() -> None:
    """Two subscriptions may each have a device named Lamp (a Tasmota plug and a Zigbee bulb): an availability
    topic naming Lamp marks both, and neither is lost because the other was configured later."""
    subs = [*Z2M, {"id": "tas", "topic": "tele/+/SENSOR", "decoder": {"type": "tasmota"}}]
    config = MqttSourceConfig.model_validate(
        {"id": "src", "host": "h", "subscriptions": subs, "availability": [{"topic": "avail/+"}]}
    )
    devices = [
        MqttDeviceConfig.model_validate(
            {
                "id": ident,
                "driver": "mqtt",
                "source": "src",
                "subscription": sub,
                "topic_name": "Lamp",
                "points": {"t": {}},
            }
        )
        for ident, sub in (("bulb", "z2m"), ("plug", "tas"))
    ]
    ingest = Ingest(config, devices)
    assert [s.point for s in run(ingest, "avail/Lamp", b"offline")] == ["bulb.t", "plug.t"]
    assert ingest.counters["bulb"].available is False
    assert ingest.counters["plug"].available is False


def test_a_message_with_some_refused_values_is_still_a_good_poll() -> None:
    ingest = build(Z2M, [], topic_name="Lamp", points={"t": {"max": 85}, "h": {}})
    run(ingest, "zigbee2mqtt/Lamp", b'{"t": 999, "h": 41}')
    counters = ingest.counters["dev"]
    assert (counters.messages, counters.rejected, counters.last_ok_ns) == (1, 0, RECEIVED_NS)
    run(ingest, "zigbee2mqtt/Lamp", b'{"t": 999}')
    assert counters.rejected == 1
