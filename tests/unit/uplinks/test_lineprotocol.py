"""Line protocol from samples: one row per case (point, value, quality) -> the line written (or nothing)."""

from __future__ import annotations

import pytest

from gateway.model import Quality, Sample
from gateway.registry import PointInfo, PointRegistry
from gateway.uplinks.lineprotocol import LineProtocolEncoder

REGISTRY = PointRegistry(
    [
        PointInfo("m1.power_kw", measurement="energy_meter", tags={"device": "m1", "floor": "2"}),
        PointInfo("m1.energy_kwh", measurement="energy_meter", tags={"device": "m1", "floor": "2"}),
        PointInfo("ahu3.fan_on", kind="bool", measurement="ahu"),
        PointInfo("ahu3.mode", kind="str", measurement="ahu"),
        PointInfo("ahu3.steps", kind="int", measurement="ahu"),
        PointInfo("odd.name", measurement="my meas,x", tags={"room": "A 1,=b"}),
        PointInfo("apt1.energy_kwh", measurement="energy_meter", tags={"device": "apt1"}, personal=True),
    ]
)
TS = 1_790_000_000_000_000_000
COMMON = ",gateway=gw1,site=tower"


def encode(*samples: Sample) -> str:
    encoder = LineProtocolEncoder(REGISTRY, common_tags={"site": "tower", "gateway": "gw1"}, include_personal=True)
    return encoder.encode(samples).decode()


@pytest.mark.parametrize(
    ("point", "value", "line"),
    [
        ("m1.power_kw", 3.25, f"energy_meter,device=m1,floor=2{COMMON} power_kw=3.25 {TS}"),
        ("m1.power_kw", 3, f"energy_meter,device=m1,floor=2{COMMON} power_kw=3.0 {TS}"),  # a float field stays float
        ("m1.power_kw", 1e21, f"energy_meter,device=m1,floor=2{COMMON} power_kw=1e+21 {TS}"),
        ("ahu3.fan_on", True, f"ahu,device=ahu3{COMMON} fan_on=true {TS}"),
        ("ahu3.mode", 'eco "night"\\', f'ahu,device=ahu3{COMMON} mode="eco \\"night\\"\\\\" {TS}'),
        ("ahu3.steps", 4, f"ahu,device=ahu3{COMMON} steps=4i {TS}"),
        ("ahu3.steps", 4.0, f"ahu,device=ahu3{COMMON} steps=4i {TS}"),
        ("odd.name", 1.5, f"my\\ meas\\,x,device=odd,gateway=gw1,room=A\\ 1\\,\\=b,site=tower name=1.5 {TS}"),
        # not in the registry: kept where personal data may go (withheld otherwise, see below)
        ("other.thing", 2.5, f"gateway,device=other{COMMON} thing=2.5 {TS}"),
    ],
)
def test_one_sample(point: str, value: object, line: str) -> None:
    assert encode(Sample(point, value, TS, Quality.GOOD)) == line  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_not_written_and_are_counted(value: float) -> None:
    encoder = LineProtocolEncoder(REGISTRY, common_tags={}, include_personal=False)
    assert encoder.encode([Sample("m1.power_kw", value, TS, Quality.GOOD)]) == b""
    assert encoder.skipped_non_finite == 1


def test_bad_samples_are_not_written_uncertain_ones_are() -> None:
    encoder = LineProtocolEncoder(REGISTRY, common_tags={}, include_personal=False)
    out = encoder.encode(
        [Sample("m1.power_kw", None, TS, Quality.BAD), Sample("m1.energy_kwh", 7.5, TS, Quality.UNCERTAIN)]
    )
    assert out == f"energy_meter,device=m1,floor=2 energy_kwh=7.5 {TS}".encode()
    assert encoder.skipped_bad == 1


def test_points_read_together_share_a_line_and_other_times_get_their_own() -> None:
    text = encode(
        Sample("m1.power_kw", 1.0, TS, Quality.GOOD),
        Sample("m1.energy_kwh", 10.0, TS, Quality.GOOD),
        Sample("m1.power_kw", 2.0, TS + 1, Quality.GOOD),
    )
    assert text.splitlines() == [
        f"energy_meter,device=m1,floor=2{COMMON} power_kw=1.0,energy_kwh=10.0 {TS}",
        f"energy_meter,device=m1,floor=2{COMMON} power_kw=2.0 {TS + 1}",
    ]


def test_personal_and_unknown_points_are_withheld_unless_the_uplink_opted_in() -> None:
    samples = [
        Sample("apt1.energy_kwh", 1523.4, TS, Quality.GOOD),
        Sample("m1.energy_kwh", 98765.5, TS, Quality.GOOD),
        Sample("gone.energy_kwh", 12.5, TS, Quality.GOOD),  # a device no longer in the site file
    ]
    default = LineProtocolEncoder(REGISTRY, common_tags={}, include_personal=False)
    for _ in range(2):  # the second time from the cache
        assert default.encode(samples).decode() == f"energy_meter,device=m1,floor=2 energy_kwh=98765.5 {TS}"
    assert default.skipped_personal == 4
    opted_in = LineProtocolEncoder(REGISTRY, common_tags={}, include_personal=True)
    assert opted_in.encode(samples).decode().splitlines() == [
        f"energy_meter,device=apt1 energy_kwh=1523.4 {TS}",
        f"energy_meter,device=m1,floor=2 energy_kwh=98765.5 {TS}",
        f"gateway,device=gone energy_kwh=12.5 {TS}",
    ]
    assert opted_in.skipped_personal == 0
