"""Property-based: arbitrary bytes (and arbitrary JSON) fed to every decoder through the router never raise, and
every message is accounted for (decoded, malformed or skipped) in the counters."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.mqtt.config import MqttDeviceConfig, MqttSourceConfig
from drivers.mqtt.ingest import Ingest
from gateway.model import Sample

POINTS = {
    "f": {"path": "$.temperature", "scale": 0.1},
    "i": {"path": "$.ENERGY.Total", "kind": "int"},
    "b": {"path": "$.switch:0.output", "kind": "bool"},
    "s": {"path": "$.0", "kind": "str"},
    "u": {"path": "$.AM2301.Temperature", "unit": "°C", "min": -60, "max": 150},
    "e": {"path": "$.aenergy.total", "unit": "kWh"},
}
TTS_POINTS = {**POINTS, "rssi": {"path": "$.@rssi", "unit": "dBm"}, "snr": {"path": "$.@snr"}}
SENML_POINTS = {
    "f": {"path": "temp", "unit": "kWh"},
    "b": {"path": "urn:x:on", "kind": "bool"},
    "s": {"path": "label", "kind": "str"},
}
DECODERS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"type": "plain"}, {"f": {"path": "$"}}),
    ({"type": "json", "timestamp": {"path": "$.ts", "format": "iso8601"}}, POINTS),
    ({"type": "json", "timestamp": {"path": "$.ts", "format": "unix_ms"}}, POINTS),
    ({"type": "zigbee2mqtt"}, POINTS),
    ({"type": "tasmota", "timezone": "Asia/Shanghai"}, POINTS),
    ({"type": "shelly_gen2"}, POINTS),
    ({"type": "senml"}, SENML_POINTS),
    ({"type": "tts_v3"}, TTS_POINTS),
]


def _ingest() -> Ingest:
    subscriptions = [
        {"id": f"s{i}", "topic": f"t{i}/+", "decoder": decoder, "max_payload": 4096}
        for i, (decoder, _) in enumerate(DECODERS)
    ]
    source = MqttSourceConfig.model_validate({"id": "src", "host": "h", "subscriptions": subscriptions})
    devices = [
        MqttDeviceConfig.model_validate(
            {"id": f"d{i}", "driver": "mqtt", "source": "src", "subscription": f"s{i}", "points": points}
        )
        for i, (_, points) in enumerate(DECODERS)
    ]
    return Ingest(source, devices)


INGEST = _ingest()


def dumps(value: Any) -> bytes:
    # the standard library writes what orjson refuses (integers past 64 bits, Infinity): more hostile input
    return json.dumps(value).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
shaped = st.fixed_dictionaries(
    {},
    optional={
        "temperature": json_values,
        "ENERGY": st.dictionaries(st.sampled_from(["Total", "x"]), json_values, max_size=2),
        "Time": json_values,
        "last_seen": json_values,
        "ts": json_values,
        "method": st.sampled_from(["NotifyStatus", "NotifyFullStatus", "NotifyEvent"]),
        "params": json_values,
        "switch:0": st.dictionaries(st.just("output"), json_values),
        "AM2301": st.dictionaries(st.just("Temperature"), json_values),
        "TempUnit": json_values | st.sampled_from(["C", "F", "K", "hPa"]),
        "aenergy": st.dictionaries(st.just("total"), json_values),
        "uplink_message": st.fixed_dictionaries(
            {}, optional={"decoded_payload": json_values, "rx_metadata": json_values}
        ),
        "received_at": json_values | st.just("2024-01-05T10:00:00.123456789Z"),
    },
)
senml = st.lists(
    st.fixed_dictionaries(
        {},
        optional=dict.fromkeys(("bn", "bt", "bv", "bs", "bu", "u", "n", "t", "v", "vs", "vb", "vd", "s"), json_values)
        | {"n": st.sampled_from(["temp", "on", "label", ""])},
    ),
    max_size=5,
)
payloads = (
    st.binary(max_size=5000)
    | json_values.map(dumps)
    | shaped.map(dumps)
    | senml.map(dumps)
    | st.text(max_size=50).map(str.encode)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, len(DECODERS) - 1), payload=payloads)
def test_no_payload_makes_any_decoder_raise(index: int, payload: bytes) -> None:
    stats = INGEST.stats[f"s{index}"]
    before = (stats.messages, stats.malformed)
    out: list[Sample] = []
    INGEST.ingest(f"t{index}/d{index}", payload, 1_750_000_000 * 10**9, out)  # must not raise
    assert stats.messages == before[0] + 1
    if stats.malformed > before[1]:
        assert out == []  # a malformed message contributes nothing
        assert "internal" not in stats.malformed_by_reason, "a decoder raised something else than MalformedPayload"
    for sample in out:
        assert sample.point.startswith(f"d{index}.")
        assert isinstance(sample.ts, int)
        assert sample.value is not None
