"""Payload units: the conversion table, and decoders converting (or refusing) what a payload states.

The property tests check the table itself (a round trip through any unit of the same dimension comes back, and a
pair without a conversion is refused) and the whole path through the router: whatever unit a payload states, a
sample that leaves is in the point's configured unit, or no sample leaves and a refusal is counted.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.mqtt.config import MqttDeviceConfig, MqttSourceConfig
from drivers.mqtt.ingest import Ingest
from drivers.mqtt.units import UNITS, UnitMismatch, canonical_unit, conversion, convert
from gateway.model import Quality, Sample

RECEIVED_NS = 1_750_000_000_123_456_789
TABLE = sorted(UNITS)
SPELLINGS = [*TABLE, "C", "F", "Cel", "degC", "kwh", "mbar", "lx", "%", "%RH", "V", "lon", ""]


@pytest.mark.parametrize(
    ("value", "source", "target", "expected"),
    [
        (0.0, "°C", "°F", 32.0),
        (100.0, "°C", "°F", 212.0),
        (-40.0, "°F", "°C", -40.0),
        (70.0, "F", "°C", 21.111111111111111),
        (0.0, "Cel", "K", 273.15),
        (300.0, "K", "°C", 26.85),
        (1_523_417.0, "Wh", "kWh", 1523.417),
        (1.5, "MWh", "kWh", 1500.0),
        (6000.0, "Wmin", "kWh", 0.1),  # Shelly Gen1 relay energy
        (2.0, "kWh", "Wh", 2000.0),
        (1500.0, "W", "kW", 1.5),
        (1013.25, "hPa", "kPa", 101.325),
        (1013.25, "mbar", "Pa", 101325.0),
        (415.0, "ppm", "ppm", 415.0),
        (3.0, "lx", "lx", 3.0),  # outside the table: converts to itself only
        (48.0, "%RH", "%", 48.0),  # SenML's humidity unit on a point written "%"
    ],
)
def test_conversion_table(value: float, source: str, target: str, expected: float) -> None:
    assert convert(value, source, target) == pytest.approx(expected, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize(("source", "target"), [("W", "kWh"), ("°C", "%"), ("lx", "lm"), ("ppm", "%"), ("V", "kV")])
def test_no_conversion_is_refused(source: str, target: str) -> None:
    with pytest.raises(UnitMismatch):
        convert(1.0, source, target)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    source=st.sampled_from(TABLE),
    target=st.sampled_from(TABLE),
    value=st.floats(min_value=-1e9, max_value=1e9, allow_nan=False),
)
def test_round_trip_or_refusal(source: str, target: str, value: float) -> None:
    if UNITS[source].dimension != UNITS[target].dimension:
        with pytest.raises(UnitMismatch):
            conversion(source, target)
        return
    there = conversion(source, target)(value)
    back = conversion(target, source)(there)
    assert math.isclose(back, value, rel_tol=1e-9, abs_tol=1e-6)


# --- through the router: no GOOD sample in a unit other than the point's ------------------------------------------


def build(subscription: dict[str, Any], points: dict[str, Any], **source: Any) -> Ingest:
    config = MqttSourceConfig.model_validate({"id": "src", "host": "h", "subscriptions": [subscription], **source})
    device = MqttDeviceConfig.model_validate(
        {"id": "dev", "driver": "mqtt", "source": "src", "topic_name": "d", "points": points}
    )
    return Ingest(config, [device])


SENML = {"id": "senml", "topic": "s/+", "decoder": {"type": "senml"}}
TASMOTA = {"id": "tas", "topic": "tele/+/SENSOR", "decoder": {"type": "tasmota"}}
SHELLY = {"id": "sh", "topic": "+/events/rpc", "decoder": {"type": "shelly_gen2"}}


def run(ingest: Ingest, topic: str, payload: bytes) -> list[Sample]:
    out: list[Sample] = []
    ingest.ingest(topic, payload, RECEIVED_NS, out)
    return out


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    payload_unit=st.sampled_from(SPELLINGS),
    point_unit=st.sampled_from(SPELLINGS[:-1]),
    value=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
)
def test_senml_sample_is_in_the_points_unit_or_refused(payload_unit: str, point_unit: str, value: float) -> None:
    ingest = build(SENML, {"e": {"path": "e", "unit": point_unit}})
    record = {"n": "e", "v": value, "u": payload_unit}
    samples = run(ingest, "s/d", (f'[{{"n":"e","v":{value!r},"u":"{payload_unit}"}}]').encode())
    counters = ingest.counters["dev"]
    if not payload_unit:  # an empty unit says nothing: taken as the point's
        assert [s.value for s in samples] == [value]
        return
    try:
        expected = convert(value, payload_unit, point_unit)
    except UnitMismatch:
        assert samples == [], f"{record} reached the bus although {payload_unit!r} is not {point_unit!r}"
        assert counters.refused == {"unit": 1}
        assert counters.rejected == 1  # nothing usable in it: not a successful poll
        return
    [sample] = samples
    assert sample.quality is Quality.GOOD
    assert sample.value == pytest.approx(expected)
    assert canonical_unit(payload_unit) != canonical_unit(point_unit) or sample.value == value
    assert counters.refused == {}


def test_senml_wh_record_on_a_kwh_point_is_converted() -> None:
    """The acceptance finding: 1,523,417 Wh stored as 1,523,417 kWh with GOOD quality."""
    ingest = build(SENML, {"energy": {"unit": "kWh"}})
    [sample] = run(ingest, "s/d", b'[{"bn":"urn:dev:meter1:","n":"energy","u":"Wh","v":1523417}]')
    assert sample.value == pytest.approx(1523.417)


def test_senml_base_unit_applies_until_a_record_states_its_own() -> None:
    ingest = build(SENML, {"a": {"unit": "kWh"}, "b": {"unit": "kWh"}, "c": {"unit": "°C"}})
    samples = run(ingest, "s/d", b'[{"bu":"Wh","n":"a","v":500},{"n":"b","v":2,"u":"MWh"},{"n":"c","u":"Cel","v":5}]')
    assert [(s.point, s.value) for s in samples] == [("dev.a", 0.5), ("dev.b", 2000.0), ("dev.c", 5.0)]


def test_tasmota_tempunit_f_is_converted_to_celsius() -> None:
    ingest = build(TASMOTA, {"t": {"path": "$.AM2301.Temperature", "unit": "°C"}, "h": {"path": "$.AM2301.Humidity"}})
    payload = b'{"Time":"2020-02-04T20:12:24","AM2301":{"Temperature":70.9,"Humidity":57.2},"TempUnit":"F"}'
    samples = run(ingest, "tele/d/SENSOR", payload)
    assert [s.point for s in samples] == ["dev.t", "dev.h"]
    assert samples[0].value == pytest.approx(21.611111, abs=1e-6)
    assert samples[1].value == 57.2  # humidity has no unit to convert


def test_tasmota_unknown_tempunit_refuses_only_the_temperature(caplog: pytest.LogCaptureFixture) -> None:
    ingest = build(TASMOTA, {"t": {"path": "$.AM2301.Temperature", "unit": "°C"}, "h": {"path": "$.AM2301.Humidity"}})
    payload = b'{"AM2301":{"Temperature":21.0,"Humidity":57.2},"TempUnit":"X"}'
    with caplog.at_level(logging.WARNING, logger="drivers.mqtt"):
        samples = run(ingest, "tele/d/SENSOR", payload)
    assert [s.point for s in samples] == ["dev.h"]
    assert ingest.counters["dev"].refused == {"unit": 1}
    assert ingest.counters["dev"].rejected == 0  # the humidity made it: the message was a good poll
    assert any("refused dev.t" in r.getMessage() and "'X'" in r.getMessage() for r in caplog.records)


def test_tasmota_energy_total_is_kwh_by_documentation() -> None:
    ingest = build(TASMOTA, {"e": {"path": "$.ENERGY.Total", "unit": "Wh"}, "p": {"path": "$.ENERGY.Power"}})
    [energy, power] = run(ingest, "tele/d/SENSOR", b'{"ENERGY":{"Total":1.25,"Power":40}}')
    assert energy.value == 1250.0
    assert power.value == 40.0  # no unit configured: passed as sent


def test_scale_is_the_operators_own_conversion_and_disables_implied_units() -> None:
    ingest = build(TASMOTA, {"p": {"path": "$.ENERGY.Power", "unit": "kW", "scale": 0.001}})
    [power] = run(ingest, "tele/d/SENSOR", b'{"ENERGY":{"Power":1500}}')
    assert power.value == 1.5  # not 0.0015: the scale already converted W to kW


def test_shelly_energy_wh_on_a_kwh_point() -> None:
    ingest = build(SHELLY, {"e": {"path": "$.switch:0.aenergy.total", "unit": "kWh"}})
    payload = b'{"method":"NotifyStatus","params":{"switch:0":{"aenergy":{"total":1234.5}}}}'
    [energy] = run(ingest, "d/events/rpc", payload)
    assert energy.value == pytest.approx(1.2345)


def test_shelly_power_on_an_energy_point_is_refused() -> None:
    ingest = build(SHELLY, {"e": {"path": "$.switch:0.apower", "unit": "kWh"}})
    assert run(ingest, "d/events/rpc", b'{"method":"NotifyStatus","params":{"switch:0":{"apower":12}}}') == []
    assert ingest.counters["dev"].refused == {"unit": 1}


def test_configured_payload_unit_for_a_format_that_does_not_say() -> None:
    z2m = {"id": "z", "topic": "z/+", "decoder": {"type": "zigbee2mqtt"}}
    ingest = build(z2m, {"energy": {"unit": "kWh", "payload_unit": "Wh"}})
    [sample] = run(ingest, "z/d", b'{"energy": 2500}')
    assert sample.value == 2.5


def test_int_point_accepts_same_unit_and_refuses_a_conversion() -> None:
    ingest = build(SENML, {"co2": {"unit": "ppm", "kind": "int"}, "e": {"unit": "kWh", "kind": "int"}})
    samples = run(ingest, "s/d", b'[{"n":"co2","u":"ppm","v":415},{"n":"e","u":"Wh","v":3000}]')
    assert samples == [Sample("dev.co2", 415, RECEIVED_NS)]
    assert ingest.counters["dev"].refused == {"unit": 1}


def test_out_of_range_value_is_refused_and_counted() -> None:
    z2m = {"id": "z", "topic": "z/+", "decoder": {"type": "zigbee2mqtt"}}
    ingest = build(z2m, {"t": {"min": -40, "max": 85}, "h": {}})
    assert run(ingest, "z/d", b'{"t": 850, "h": 40}') == [Sample("dev.h", 40.0, RECEIVED_NS)]
    assert ingest.counters["dev"].refused == {"range": 1}


def test_a_unit_that_is_not_text_is_refused() -> None:
    ingest = build(SENML, {"e": {"unit": "kWh"}})
    assert run(ingest, "s/d", b'[{"n":"e","u":5,"v":1}]') == []
    assert ingest.counters["dev"].refused == {"unit": 1}
