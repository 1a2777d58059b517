"""Decoders, router and counters, driven without a broker.

Golden cases live in ``tests/cases/mqtt/*.yaml``: each names where its payload shape is documented, the subscription
and device config, the topic and payload, and the samples (or the malformed reason) expected.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from drivers.mqtt.config import MqttDeviceConfig, MqttSourceConfig
from drivers.mqtt.ingest import TOPIC_CACHE_SIZE, Ingest, RateLimitedLog
from gateway.config.source import load_yaml
from gateway.model import Quality, Sample

CASES = sorted((Path(__file__).parents[2] / "cases" / "mqtt").glob("*.yaml"))
RECEIVED_NS = 1_750_000_000_123_456_789


def build(subscription: dict[str, Any], device: dict[str, Any], **source: Any) -> Ingest:
    config = MqttSourceConfig.model_validate(
        {"id": "src", "host": "localhost", "subscriptions": [subscription], **source}
    )
    dev = MqttDeviceConfig.model_validate({"id": "dev", "driver": "mqtt", "source": "src", **device})
    return Ingest(config, [dev])


def run(ingest: Ingest, topic: str, payload: bytes) -> list[Sample]:
    out: list[Sample] = []
    ingest.ingest(topic, payload, RECEIVED_NS, out)
    return out


def load_case(path: Path) -> dict[str, Any]:
    # the gateway's strict loader: a point named ``on`` stays a string, as in a site file
    data, _ = load_yaml(path)
    assert isinstance(data, dict)
    return data


def test_there_are_golden_cases_for_every_decoder() -> None:
    types = {load_case(path)["subscription"]["decoder"]["type"] for path in CASES}
    assert types == {"plain", "json", "zigbee2mqtt", "tasmota", "shelly_gen2", "senml", "tts_v3"}


@pytest.mark.parametrize("case_path", CASES, ids=[p.stem for p in CASES])
def test_golden_case(case_path: Path) -> None:
    case = load_case(case_path)
    assert case["documented_at"], "every case names where its payload shape is documented"
    ingest = build(case["subscription"], case["device"])
    samples = run(ingest, case["topic"], case["payload"].encode("utf-8"))
    stats = ingest.stats[case["subscription"]["id"]]
    assert stats.messages == 1
    if "malformed" in case:
        assert stats.malformed_by_reason == {case["malformed"]: 1}
        assert ingest.counters["dev"].rejected == 1
    else:
        assert stats.malformed == 0
    assert ingest.counters["dev"].refused == case.get("refused", {})
    assert [s.point for s in samples] == [e["point"] for e in case["expected"]]
    for sample, expected in zip(samples, case["expected"], strict=True):
        if type(expected["value"]) is float:
            assert sample.value == pytest.approx(expected["value"], rel=1e-12)
        else:
            assert sample.value == expected["value"]
        assert type(sample.value) is type(expected["value"])
        assert sample.quality is Quality.GOOD
        if expected.get("ts") == "received":
            assert sample.ts == RECEIVED_NS
        else:
            assert sample.ts == pytest.approx(expected["ts_s"] * 1e9, abs=1_000)


Z2M = {"id": "z2m", "topic": "zigbee2mqtt/+", "decoder": {"type": "zigbee2mqtt"}}


def test_absent_configured_field_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    ingest = build(Z2M, {"topic_name": "s", "points": {"temperature": {}, "co2": {}}})
    with caplog.at_level(logging.WARNING, logger="drivers.mqtt"):
        for _ in range(3):
            assert [s.point for s in run(ingest, "zigbee2mqtt/s", b'{"temperature": 20}')] == ["dev.temperature"]
    reports = [r for r in caplog.records if "no field" in r.getMessage()]
    assert len(reports) == 1
    assert "dev.co2" in reports[0].getMessage()


def test_null_field_is_skipped_silently_and_unknown_fields_ignored() -> None:
    ingest = build(Z2M, {"topic_name": "s", "points": {"temperature": {}, "humidity": {}}})
    samples = run(ingest, "zigbee2mqtt/s", b'{"temperature": null, "humidity": 41, "whatever": [1, {"x": 2}]}')
    assert samples == [Sample("dev.humidity", 41.0, RECEIVED_NS)]
    assert ingest.stats["z2m"].malformed == 0


def test_a_bad_field_drops_the_whole_message_not_half_of_it() -> None:
    ingest = build(Z2M, {"topic_name": "s", "points": {"temperature": {}, "humidity": {}}})
    out = [Sample("earlier.sample", 1.0, 1)]
    ingest.ingest("zigbee2mqtt/s", b'{"temperature": 20, "humidity": "high"}', RECEIVED_NS, out)
    assert out == [Sample("earlier.sample", 1.0, 1)]  # the batch keeps what it had, and nothing of this message
    assert ingest.stats["z2m"].malformed_by_reason == {"type": 1}


@pytest.mark.parametrize(
    ("kind", "raw", "expected"),
    [
        ("float", b"21", 21.0),
        ("int", b"21.0", 21),
        ("bool", b'"OFF"', False),
        ("bool", b'"on"', True),
        ("bool", b"1", True),
        ("str", b'"idle"', "idle"),
        ("str", b"3", "3"),
    ],
)
def test_value_kinds(kind: str, raw: bytes, expected: object) -> None:
    ingest = build(Z2M, {"topic_name": "s", "points": {"v": {"kind": kind}}})
    [sample] = run(ingest, "zigbee2mqtt/s", b'{"v": ' + raw + b"}")
    assert sample.value == expected
    assert type(sample.value) is type(expected)


@pytest.mark.parametrize(
    ("kind", "raw"), [("float", b"true"), ("int", b"2.5"), ("bool", b'"maybe"'), ("str", b"{}"), ("float", b"[]")]
)
def test_wrong_types_are_malformed(kind: str, raw: bytes) -> None:
    ingest = build(Z2M, {"topic_name": "s", "points": {"v": {"kind": kind}}})
    assert run(ingest, "zigbee2mqtt/s", b'{"v": ' + raw + b"}") == []
    assert ingest.stats["z2m"].malformed_by_reason == {"type": 1}


def test_scale_and_offset() -> None:
    ingest = build(Z2M, {"topic_name": "s", "points": {"t": {"path": "$.raw", "scale": 0.1, "offset": -40}}})
    [sample] = run(ingest, "zigbee2mqtt/s", b'{"raw": 650}')
    assert sample.value == pytest.approx(25.0)


def test_oversize_payload_is_malformed_before_decoding() -> None:
    ingest = build({**Z2M, "max_payload": 64}, {"topic_name": "s", "points": {"t": {}}})
    assert run(ingest, "zigbee2mqtt/s", b'{"t": 1, "pad": "' + b"x" * 100 + b'"}') == []
    assert ingest.stats["z2m"].malformed_by_reason == {"oversize": 1}


def test_plain_decoder_reads_text_and_rejects_bad_text() -> None:
    sub = {"id": "p", "topic": "sensors/+/temperature", "decoder": {"type": "plain"}}
    ingest = build(sub, {"topic_name": "t1", "points": {"temperature": {"path": "$"}}})
    assert run(ingest, "sensors/t1/temperature", b" 21.5\n") == [Sample("dev.temperature", 21.5, RECEIVED_NS)]
    assert run(ingest, "sensors/t1/temperature", b"nan") == []
    assert run(ingest, "sensors/t1/temperature", b"warm") == []
    assert run(ingest, "sensors/t1/temperature", b"\xff\xfe") == []
    assert ingest.stats["p"].malformed_by_reason == {"type": 2, "encoding": 1}


def test_json_timestamp_formats() -> None:
    def stamp(fmt: str, raw: bytes) -> int:
        sub = {"id": "j", "topic": "v/+", "decoder": {"type": "json", "timestamp": {"path": "$.ts", "format": fmt}}}
        ingest = build(sub, {"topic_name": "d", "points": {"x": {}}})
        [sample] = run(ingest, "v/d", b'{"x": 1, "ts": ' + raw + b"}")
        return sample.ts

    assert stamp("unix_s", b"1700000000") == 1_700_000_000 * 10**9
    assert stamp("unix_ms", b"1700000000123") == 1_700_000_000_123 * 10**6
    assert stamp("unix_ns", b"1700000000123456789") == 1_700_000_000_123_456_789
    assert stamp("iso8601", b'"2023-11-14T22:13:20Z"') == 1_700_000_000 * 10**9
    assert stamp("unix_s", b"99999999999999") == RECEIVED_NS  # far in the future: the device clock is not believed


def test_unmapped_topics_are_counted_not_decoded() -> None:
    ingest = build(Z2M, {"topic_name": "known", "points": {"t": {}}})
    assert run(ingest, "zigbee2mqtt/unknown", b"{not json") == []
    assert ingest.stats["z2m"].unmapped == 1
    assert ingest.stats["z2m"].malformed == 0


def test_topic_cache_stays_bounded() -> None:
    ingest = build(Z2M, {"topic_name": "known", "points": {"t": {}}})
    for i in range(TOPIC_CACHE_SIZE + 10):
        run(ingest, f"zigbee2mqtt/other{i}", b"{}")
    assert len(ingest._cache) <= TOPIC_CACHE_SIZE
    assert run(ingest, "zigbee2mqtt/known", b'{"t": 1}') == [Sample("dev.t", 1.0, RECEIVED_NS)]


def test_rate_limited_log_uses_the_clock_and_reports_what_it_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limiter = RateLimitedLog(logging.getLogger("test.ratelimit"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        results = [limiter.warning("sub", "bad message %d", i) for i in range(5)]
        now[0] += 10.0
        results.append(limiter.warning("sub", "bad message %d", 5))
        results.append(limiter.warning("other", "other key"))
    assert results == [True, False, False, False, False, True, True]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["bad message 0", "bad message 5 (4 similar suppressed)", "other key"]


def test_malformed_flood_is_logged_at_a_limited_rate(caplog: pytest.LogCaptureFixture) -> None:
    ingest = build(Z2M, {"topic_name": "s", "points": {"t": {}}})
    with caplog.at_level(logging.WARNING, logger="drivers.mqtt"):
        for _ in range(1000):
            run(ingest, "zigbee2mqtt/s", b"{broken")
    assert ingest.stats["z2m"].malformed == 1000
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) == 1
