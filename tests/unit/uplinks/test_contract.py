"""Every payload the platform contract builds validates against its JSON Schema in gateway/uplinks/schemas/."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from gateway.model import Event, Quality, Sample
from gateway.outbox import StoredEvent, TelemetryBatch
from gateway.registry import PointInfo, PointRegistry
from gateway.uplinks import contract

SCHEMAS = Path(contract.__file__).parent / "schemas"
BASE = "city/tower/gw1"
TS = 1_790_000_000_123_456_789
#: the points the telemetry tests send: all known, none personal
SHARED = contract.PlatformPoints(
    PointRegistry(PointInfo(f"{d}.{n}") for d in ("m1", "m2") for n in ("power_kw", "energy_kwh", "voltage"))
)


def telemetry(rows: list[TelemetryBatch], *, historical: bool = False) -> list[tuple[str, bytes]]:
    return list(contract.telemetry_messages(BASE, rows, historical=historical, shared=SHARED))


def check(schema: str, payload: bytes) -> dict[str, Any]:
    doc = orjson.loads(payload)
    jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"{schema}.schema.json").read_text())).validate(doc)
    return doc  # type: ignore[no-any-return]


def test_every_schema_is_itself_valid() -> None:
    names = sorted(p.name for p in SCHEMAS.glob("*.schema.json"))
    assert names == sorted(
        f"{n}.schema.json"
        for n in ("command-result", "command-write", "event", "meta", "publish", "status", "telemetry", "telemetry-v2")
    )
    for path in SCHEMAS.glob("*.schema.json"):
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


def test_status_and_meta() -> None:
    online = check("status", contract.status_payload("online", reason="connected", ts_ms=5, version="0.1.0"))
    assert online["state"] == "online"
    assert "since" not in online
    # the Last Will can only say when the connection began: `since`, and `ts` the same for contract v1
    will = check("status", contract.will_payload(connected_ms=7, version="0.1.0"))
    assert will == will | {"state": "offline", "reason": "lost", "since": 7, "ts": 7}
    registry = PointRegistry(
        [
            PointInfo("m1.energy_kwh", unit="kWh", measurement="energy_meter", tags={"device": "m1"}),
            PointInfo("ahu3.setpoint", kind="int", writable=True, min=20, max=100),
            PointInfo("zone3.co2_avg15", physical=False),
        ]
    )
    meta = check("meta", contract.meta_payload(site="tower", gateway="gw1", name=None, registry=registry, ts_ms=5))
    assert meta["devices"]["ahu3"]["points"]["setpoint"] == {
        "kind": "int", "writable": True, "measurement": "gateway", "min": 20, "max": 100,
    }  # fmt: skip
    assert meta["devices"]["zone3"]["points"]["co2_avg15"]["derived"] is True


def test_telemetry_one_message_per_device_and_read_with_quality_and_the_historical_flag() -> None:
    row = TelemetryBatch(
        17,
        0,
        [
            Sample("m1.power_kw", 3.5, TS, Quality.GOOD),
            Sample("m1.energy_kwh", 1200.25, TS, Quality.GOOD),
            Sample("m2.power_kw", None, TS, Quality.BAD),
            Sample("m2.voltage", 250.0, TS, Quality.UNCERTAIN),
            Sample("m1.power_kw", 3.6, TS + 10**9, Quality.GOOD),
        ],
    )
    messages = [(t, check("telemetry", p)) for t, p in telemetry([row], historical=True)]
    assert messages == [
        (f"{BASE}/telemetry/m1", {"v": 1, "seq": 17, "ts": TS // 10**6, "historical": True,
                                  "values": {"power_kw": 3.5, "energy_kwh": 1200.25}}),
        (f"{BASE}/telemetry/m2", {"v": 1, "seq": 17, "ts": TS // 10**6, "historical": True,
                                  "values": {"voltage": 250.0},
                                  "quality": {"power_kw": "bad", "voltage": "uncertain"}}),
        (f"{BASE}/telemetry/m1", {"v": 1, "seq": 17, "ts": TS // 10**6 + 1000, "historical": True,
                                  "values": {"power_kw": 3.6}}),
    ]  # fmt: skip
    live = [orjson.loads(p) for _t, p in telemetry([row])]
    assert all("historical" not in m for m in live)


def telemetry_v2(rows: list[TelemetryBatch], *, historical: bool = False) -> list[tuple[str, dict[str, Any]]]:
    return [
        (t, check("telemetry-v2", p))
        for t, p in contract.telemetry_messages_v2(BASE, rows, historical=historical, shared=SHARED)
    ]


def test_telemetry_v2_one_message_per_device_and_batch_each_read_with_its_own_time() -> None:
    # m1 read in two requests (two times) in one poll: v1 sends two messages, v2 one with two reads
    row = TelemetryBatch(
        17,
        0,
        [
            Sample("m1.power_kw", 3.5, TS, Quality.GOOD),
            Sample("m1.energy_kwh", 1200.25, TS, Quality.GOOD),
            Sample("m2.power_kw", None, TS, Quality.BAD),
            Sample("m2.voltage", 250.0, TS, Quality.UNCERTAIN),
            Sample("m1.voltage", 231.0, TS + 3_000_000, Quality.GOOD),
            Sample("m1.secret", 1.0, TS, Quality.GOOD),  # unknown to the registry: withheld
        ],
    )
    assert len(telemetry([row])) == 3
    assert telemetry_v2([row], historical=True) == [
        (f"{BASE}/telemetry/m1", {"v": 2, "seq": 17, "historical": True, "reads": [
            {"ts": TS // 10**6, "values": {"power_kw": 3.5, "energy_kwh": 1200.25}},
            {"ts": TS // 10**6 + 3, "values": {"voltage": 231.0}},
        ]}),
        (f"{BASE}/telemetry/m2", {"v": 2, "seq": 17, "historical": True, "reads": [
            {"ts": TS // 10**6, "values": {"voltage": 250.0}, "quality": {"power_kw": "bad", "voltage": "uncertain"}},
        ]}),
    ]  # fmt: skip
    assert all("historical" not in doc for _t, doc in telemetry_v2([row]))


def test_telemetry_v2_says_why_a_bad_point_has_no_value_and_v1_stays_as_it_was() -> None:
    row = TelemetryBatch(
        18,
        0,
        [
            Sample("m2.power_kw", None, TS, Quality.BAD, "link_down"),
            Sample("m2.voltage", None, TS, Quality.BAD),  # no reason known: none sent
            Sample("m1.power_kw", 3.5, TS, Quality.GOOD),
        ],
    )
    assert telemetry_v2([row]) == [
        (f"{BASE}/telemetry/m2", {"v": 2, "seq": 18, "reads": [
            {"ts": TS // 10**6, "values": {}, "quality": {"power_kw": "bad", "voltage": "bad"},
             "reason": {"power_kw": "link_down"}},
        ]}),
        (f"{BASE}/telemetry/m1", {"v": 2, "seq": 18, "reads": [{"ts": TS // 10**6, "values": {"power_kw": 3.5}}]}),
    ]  # fmt: skip
    v1 = {topic: check("telemetry", payload) for topic, payload in telemetry([row])}
    assert v1[f"{BASE}/telemetry/m2"]["quality"] == {"power_kw": "bad", "voltage": "bad"}
    assert "reason" not in v1[f"{BASE}/telemetry/m2"]  # version 1's schema has no room for it


def test_the_outbox_keeps_a_reason_and_reads_rows_stored_before_reasons_existed() -> None:
    from gateway.outbox import decode_samples, encode_samples

    samples = [Sample("m1.power_kw", 3.5, TS), Sample("m2.power_kw", None, TS, Quality.BAD, "no_answer")]
    assert decode_samples(encode_samples(samples)) == samples
    assert encode_samples(samples[:1]) == orjson.dumps([["m1.power_kw", 3.5, TS, 0]])  # as before reasons
    old_row = orjson.dumps([["m2.power_kw", None, TS, 2]])
    assert decode_samples(old_row) == [Sample("m2.power_kw", None, TS, Quality.BAD)]


def test_telemetry_v2_carries_every_value_v1_carries() -> None:
    """The same samples through both versions: the (device, ts, point, value, quality) facts are identical."""
    rows = [
        TelemetryBatch(
            seq,
            0,
            [
                Sample(f"m{d}.{n}", seq * 10 + k, TS + (k % 2) * 10**6, Quality.GOOD if k != 2 else Quality.BAD)
                for d in (1, 2)
                for k, n in enumerate(("power_kw", "energy_kwh", "voltage"))
            ]
            + [Sample("m1.power_kw", -1.0, TS, Quality.GOOD)],  # the same point twice at one time
        )
        for seq in (1, 2)
    ]

    def facts_v1() -> list[tuple[str, int, int, str, object]]:
        out = []
        for topic, payload in telemetry(rows):
            doc = orjson.loads(payload)
            out += [(topic, doc["seq"], doc["ts"], n, v) for n, v in doc["values"].items()]
            out += [(topic, doc["seq"], doc["ts"], n, q) for n, q in doc.get("quality", {}).items()]
        return sorted(out, key=repr)

    def facts_v2() -> list[tuple[str, int, int, str, object]]:
        out = []
        for topic, doc in telemetry_v2(rows):
            for read in doc["reads"]:
                out += [(topic, doc["seq"], read["ts"], n, v) for n, v in read["values"].items()]
                out += [(topic, doc["seq"], read["ts"], n, q) for n, q in read.get("quality", {}).items()]
        return sorted(out, key=repr)

    assert facts_v2() == facts_v1()
    assert len(telemetry_v2(rows)) == 4  # two batches x two devices
    assert len(telemetry(rows)) == 10  # two batches x two devices x two times, plus the repeated point, twice


def test_the_same_point_twice_at_one_time_in_one_batch_keeps_both_values_in_order() -> None:
    row = TelemetryBatch(
        3, 0, [Sample("m1.power_kw", 1.0, TS, Quality.GOOD), Sample("m1.power_kw", 2.0, TS, Quality.GOOD)]
    )
    values = [orjson.loads(p)["values"] for _t, p in telemetry([row])]
    assert values == [{"power_kw": 1.0}, {"power_kw": 2.0}]


def test_personal_and_unknown_points_never_reach_telemetry_or_meta() -> None:
    registry = PointRegistry(
        [
            PointInfo("apt101.energy_kwh", unit="kWh", personal=True),
            PointInfo("apt101.power_kw", unit="kW", personal=True),
            PointInfo("apt102.energy_kwh", unit="kWh", personal=True),
            PointInfo("apt102.link_ok", kind="bool"),
            PointInfo("main.energy_kwh", unit="kWh"),
        ]
    )
    row = TelemetryBatch(
        5,
        0,
        [
            Sample("apt101.energy_kwh", 1523.4, TS, Quality.GOOD),
            Sample("apt101.power_kw", None, TS, Quality.BAD),  # not even its quality goes out
            Sample("apt102.energy_kwh", 877.1, TS, Quality.UNCERTAIN),
            Sample("apt102.link_ok", True, TS, Quality.GOOD),
            Sample("main.energy_kwh", 98765.5, TS, Quality.GOOD),
            Sample("removed.energy_kwh", 12.5, TS, Quality.GOOD),  # not in the registry: withheld too
        ],
    )
    shared = contract.PlatformPoints(registry)
    sent = list(contract.telemetry_messages(BASE, [row], historical=False, shared=shared))
    messages = [(t, check("telemetry", p)) for t, p in sent]
    assert messages == [
        (f"{BASE}/telemetry/apt102", {"v": 1, "seq": 5, "ts": TS // 10**6, "values": {"link_ok": True}}),
        (f"{BASE}/telemetry/main", {"v": 1, "seq": 5, "ts": TS // 10**6, "values": {"energy_kwh": 98765.5}}),
    ]
    assert b"1523.4" not in b"".join(p for _t, p in sent)
    meta = check("meta", contract.meta_payload(site="tower", gateway="gw1", name=None, registry=registry, ts_ms=5))
    assert meta["devices"] == {
        "apt102": {"points": {"link_ok": {"kind": "bool", "writable": False, "measurement": "gateway"}}},
        "main": {"points": {"energy_kwh": {"kind": "float", "writable": False, "measurement": "gateway",
                                           "unit": "kWh"}}},
    }  # fmt: skip
    # a point registered later (a reloaded rule's derived point) is shared from then on
    assert "removed.energy_kwh" not in shared
    registry.add(PointInfo("removed.energy_kwh"))
    assert "removed.energy_kwh" in shared


def test_events_and_rule_publications() -> None:
    alarm = StoredEvent(1, 0, Event("a-1", "alarm", "zone3.co2", TS, {"value": 1300}))
    topic, payload = contract.event_message(BASE, alarm)
    assert topic == f"{BASE}/events/alarm"
    assert check("event", payload)["id"] == "a-1"
    publication = StoredEvent(2, 0, Event("p-1", "publish", "alerts/zone3/co2", TS, {"co2": 1300}))
    topic, payload = contract.event_message(BASE, publication)
    assert topic == f"{BASE}/alerts/zone3/co2"
    assert check("publish", payload)["payload"] == {"co2": 1300}
    result = StoredEvent(3, 0, Event("cmd-result:dr-1", "command_result", "dr-1", TS, {
        "command_id": "dr-1", "action": "write", "point": "ahu3.setpoint", "value": 40, "status": "applied",
        "message": None}))  # fmt: skip
    body = check("event", contract.event_message(BASE, result)[1])["body"]
    jsonschema.validate(body, json.loads((SCHEMAS / "command-result.schema.json").read_text()))


@pytest.mark.parametrize(
    ("subject", "problem"),
    [
        ("alerts/zone3", None),
        ("", "relative topic"),
        ("/alerts", "relative topic"),
        ("alerts//x", "relative topic"),
        ("alerts/#", "wildcards"),
        ("alerts/+/x", "wildcards"),
        ("status", "collides"),
        ("cmd/write", "collides"),
        ("telemetry/m1", "collides"),
    ],
)
def test_publish_topics_stay_under_the_gateway_and_off_its_own_topics(subject: str, problem: str | None) -> None:
    found = contract.publish_topic_problem(subject)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_the_documented_command_example_is_valid() -> None:
    example = {"v": 1, "id": "dr-2026-11-27-0042", "point": "ahu3.vent_setpoint_pct", "value": 40, "ts": 1795300000000}
    jsonschema.validate(example, json.loads((SCHEMAS / "command-write.schema.json").read_text()))
    schema = json.loads((SCHEMAS / "command-write.schema.json").read_text())
    for bad in ({**example, "point": "AHU3"}, {k: v for k, v in example.items() if k != "ts"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_telemetry_v1_and_v2_agree_on_shuffled_batches() -> None:
    """Interleaved devices and times, repeated points, every quality, unknown points: the fast paths of both
    builders (the read the last sample went to) against the facts each sample states. Seeded: the same cases on
    every run."""
    rng = random.Random(19)
    points = [f"m{d}.{n}" for d in (1, 2) for n in ("power_kw", "energy_kwh", "voltage")] + ["m3.unknown"]
    for seq in range(1, 200):
        samples = [
            Sample(
                rng.choice(points),
                float(rng.randint(0, 5)),
                TS + rng.randint(0, 2) * 10**6,
                rng.choice((Quality.GOOD, Quality.GOOD, Quality.UNCERTAIN, Quality.BAD)),
            )
            for _ in range(rng.randint(1, 12))
        ]
        row = [TelemetryBatch(seq, 0, samples)]
        facts: list[tuple[str, int, str, object, str]] = []
        for point, value, ts, quality, _reason in samples:
            if point == "m3.unknown":
                continue
            device, _, name = point.partition(".")
            facts.append((device, ts // 10**6, name, None if quality is Quality.BAD else value, quality.name))
        v1: list[tuple[str, int, str, object, str]] = []
        for topic, payload in telemetry(row):
            doc = orjson.loads(payload)
            quality = doc.get("quality", {})
            names = list(doc["values"]) + [n for n in quality if n not in doc["values"]]
            v1 += [
                (topic.rsplit("/", 1)[1], doc["ts"], n, doc["values"].get(n), quality.get(n, "good").upper())
                for n in names
            ]
        v2: list[tuple[str, int, str, object, str]] = []
        for topic, doc in telemetry_v2(row):
            for read in doc["reads"]:
                quality = read.get("quality", {})
                names = list(read["values"]) + [n for n in quality if n not in read["values"]]
                v2 += [
                    (topic.rsplit("/", 1)[1], read["ts"], n, read["values"].get(n), quality.get(n, "good").upper())
                    for n in names
                ]
        assert sorted(v1, key=repr) == sorted(facts, key=repr), samples
        assert sorted(v2, key=repr) == sorted(facts, key=repr), samples
