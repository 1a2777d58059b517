"""Core types and the point registry."""

from __future__ import annotations

import pickle

import pytest

from gateway.model import Command, Event, Quality, Sample, is_point_id, split_point_id
from gateway.registry import DuplicatePoint, PointInfo, PointRegistry


def test_sample_is_an_immutable_record() -> None:
    sample = Sample("zone3.co2", 612.0, 1_700_000_000_000_000_000)
    assert sample.quality is Quality.GOOD
    with pytest.raises(AttributeError):
        sample.value = 1.0  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(sample)) == sample


def test_quality_orders_from_good_to_bad() -> None:
    assert Quality.GOOD < Quality.UNCERTAIN < Quality.BAD
    assert max(Quality.GOOD, Quality.BAD) is Quality.BAD


@pytest.mark.parametrize("point", ["zone3.co2", "a.b", "ahu_3.vent_setpoint_pct", "m1.x9"])
def test_valid_point_ids(point: str) -> None:
    assert is_point_id(point)
    device, name = split_point_id(point)
    assert f"{device}.{name}" == point


@pytest.mark.parametrize(
    "point", ["zone3", "Zone3.co2", "zone3.CO2", "3zone.co2", "zone3.co2.avg", "zone-3.co2", ".co2", "zone3.", ""]
)
def test_invalid_point_ids(point: str) -> None:
    assert not is_point_id(point)
    with pytest.raises(ValueError, match="not a point id"):
        split_point_id(point)


def test_command_and_event_carry_their_origin_and_id() -> None:
    command = Command("ahu3.vent_setpoint_pct", 60, "co2-high-ventilate")
    assert command.origin == "co2-high-ventilate"
    event = Event("co2-high:1700000000", "alarm", "zone3", 1, {"co2": 1200})
    assert event.id == "co2-high:1700000000"


def test_registry_groups_points_by_device_and_refuses_duplicates() -> None:
    registry = PointRegistry([PointInfo("m1.power_kw", unit="kW"), PointInfo("m1.energy_kwh", unit="kWh")])
    registry.add(PointInfo("z1.co2", unit="ppm"))
    assert registry.devices() == ["m1", "z1"]
    assert registry.points_of("m1") == ["m1.power_kw", "m1.energy_kwh"]
    assert registry["z1.co2"].device == "z1"
    assert registry["z1.co2"].name == "co2"
    with pytest.raises(DuplicatePoint):
        registry.add(PointInfo("m1.power_kw"))
    with pytest.raises(ValueError, match="not a point id"):
        registry.add(PointInfo("M1.power"))
    assert len(registry) == 3
