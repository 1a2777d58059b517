"""BACnet config models (bad input refused with a clear message) and the RPM planner (pure)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from drivers.bacnet.config import BacnetNetworkConfig, BacnetPoint, BacnetProfile, ObjectId
from drivers.bacnet.planner import PlannedPoint, answer_budget, describe_plan, plan_reads, split_request


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"object": "analog-input"}, "type,instance"),
        ({"object": "analog-thing,1"}, "unknown or unsupported object type"),
        ({"object": "analog-input,4194303"}, "past the highest"),
        ({"object": "analog-input,1", "unit": "furlongs"}, "unknown BACnet engineering unit"),
        ({"object": "analog-input,1", "writable": True}, "inputs are read-only"),
        ({"object": "analog-output,1", "writable": True, "priority": 6}, "reserved"),
        ({"object": "analog-output,1", "writable": True, "priority": 17}, "less than or equal to 16"),
        ({"object": "binary-input,1", "unit": "percent"}, "has no engineering unit"),
        ({"object": "analog-output,1", "min": 5, "max": 1}, "greater than max"),
        ({"object": "analog-output,1", "property": "Present_Value"}, "property name"),
    ],
)
def test_bad_points_are_refused_with_the_reason(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        BacnetPoint.model_validate(spec)


def test_point_kinds_and_units() -> None:
    temp = BacnetPoint.model_validate({"object": "analog-input,1", "unit": "degrees-celsius"})
    fan = BacnetPoint.model_validate({"object": "binary-output,2"})
    mode = BacnetPoint.model_validate({"object": "multi-state-value,3"})
    assert (temp.kind, temp.our_unit, temp.object) == ("float", "°C", ObjectId("analog-input", 1))
    assert (fan.kind, mode.kind) == ("bool", "int")
    assert BacnetPoint.model_validate({"object": "analog-value,1", "unit": "no-units"}).our_unit is None


def test_a_profile_reading_one_property_twice_is_refused() -> None:
    with pytest.raises(ValidationError, match="reads the same property as a"):
        BacnetProfile.model_validate(
            {
                "driver": "bacnet",
                "vendor": "v",
                "model": "m",
                "doc": "d",
                "points": {"a": {"object": "analog-input,1"}, "b": {"object": "analog-input, 1"}},
            }
        )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"address": "gateway.local"}, "not an IPv4 address"),
        ({"address": "10.0.0.1/24", "foreign": {"bbmd": "10.1.0.1:99999"}}, "port"),
        ({"address": "10.0.0.1/24", "backoff_min": "2min", "backoff_max": "1min"}, "backoff_min"),
        ({"address": "10.0.0.1/24", "port": "47808"}, "expected int"),
    ],
)
def test_bad_networks_are_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        BacnetNetworkConfig.model_validate({"id": "bms", **data})


def test_foreign_registration_ttl() -> None:
    net = BacnetNetworkConfig.model_validate(
        {"id": "bms", "address": "10.0.0.9/24", "foreign": {"bbmd": "10.1.0.1:47808", "ttl": "10min"}}
    )
    assert net.foreign is not None and net.foreign.ttl == 600.0 and net.bind == "10.0.0.9/24:47808"


def points(count: int, objects: int = 0) -> list[PlannedPoint]:
    """``count`` present-values, on their own objects (or spread over ``objects`` objects, several properties)."""
    result = []
    for i in range(count):
        obj = ObjectId("analog-value", i % objects if objects else i)
        prop = "present-value" if not objects or i < objects else f"high-limit-{i}"
        result.append(PlannedPoint(f"d.p{i}", obj, prop if prop == "present-value" else "high-limit", i, "float"))
    return result


def test_everything_fits_one_request_on_a_segmenting_device() -> None:
    plan = plan_reads(points(50), budget=answer_budget(1476, "segmented-both"), max_properties=200)
    assert len(plan) == 1 and plan[0].properties == 100  # 50 present-values and 50 status-flags
    assert describe_plan(plan, 50) == "1 ReadPropertyMultiple request reading 100 properties for 50 points"


@pytest.mark.parametrize("max_apdu", [128, 206, 480, 1476])
def test_requests_fit_the_apdu_without_segmentation(max_apdu: int) -> None:
    planned = points(50)
    plan = plan_reads(planned, budget=answer_budget(max_apdu, "no-segmentation"), max_properties=200)
    assert all(r.size <= max_apdu for r in plan)
    assert sorted(p.point for r in plan for p in r.points) == sorted(p.point for p in planned)
    if max_apdu < 1476:
        assert len(plan) > 1


def test_max_properties_caps_a_request() -> None:
    plan = plan_reads(points(30), budget=10_000, max_properties=10)
    assert [r.properties for r in plan] == [10, 10, 10, 10, 10, 10]


def test_split_halves_by_object_then_by_property() -> None:
    request = plan_reads(points(4), budget=10_000, max_properties=100)[0]
    halves = split_request(request)
    assert [len(h.objects) for h in halves] == [2, 2]
    assert sorted(p.point for h in halves for p in h.points) == ["d.p0", "d.p1", "d.p2", "d.p3"]
    single = plan_reads(points(1), budget=10_000, max_properties=100)[0]
    by_property = split_request(single)
    assert [h.properties for h in by_property] == [1, 1]
    assert split_request(by_property[1]) == [by_property[1]]
