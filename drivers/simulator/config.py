"""Config models of the simulator: the device entry in a site file and the ``driver: simulator`` profile.

Imports no protocol library (config must stay cheap to load).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from gateway.config.types import Ident, PositiveDuration, StrictModel
from gateway.points import profile_point_infos
from gateway.registry import PointInfo, ValueKind

#: the point names each simulated model produces; a profile must list exactly these
MODEL_POINTS: dict[str, tuple[str, ...]] = {
    "energy_meter": ("power_kw", "energy_kwh", "voltage", "current", "pf"),
    "zone": ("temperature", "co2", "occupancy", "humidity"),
    "ahu": ("supply_temp", "fan_speed_pct", "vent_setpoint_pct", "filter_dp_pa"),
}


class SimPointSpec(StrictModel):
    unit: str | None = None
    kind: ValueKind = "float"
    writable: bool = False
    min: float | None = None
    max: float | None = None
    description: str | None = None
    #: personal data: never sent raw to the city platform (docs/privacy.md)
    personal: bool = False
    #: an energy meter's rating in kW (the most power it can measure): incentive readings implying more are flagged
    max_power_kw: Annotated[float, Field(gt=0)] | None = None


class SimulatorProfile(StrictModel):
    driver: Literal["simulator"]
    vendor: str = "simulated"
    model: Literal["energy_meter", "zone", "ahu"]
    description: str | None = None
    points: dict[Ident, SimPointSpec]

    @model_validator(mode="after")
    def _points_match_model(self) -> SimulatorProfile:
        expected = set(MODEL_POINTS[self.model])
        missing = expected - set(self.points)
        extra = set(self.points) - expected
        if missing or extra:
            raise ValueError(
                f"model {self.model} produces points {sorted(expected)}; "
                f"missing {sorted(missing)}, unknown {sorted(extra)}"
            )
        return self


class SimulatorDeviceConfig(StrictModel):
    """``{id: zone3, driver: simulator, profile: sim-zone, seed: 3, poll: 1s}``"""

    profile_model: ClassVar[type[StrictModel]] = SimulatorProfile

    id: Ident
    driver: Literal["simulator"]
    profile: str
    poll: PositiveDuration = 1.0
    seed: int = 0
    #: scales the simulated load (an apartment meter draws less than a plant room)
    scale: float = Field(default=1.0, gt=0)
    tags: dict[str, str] = Field(default_factory=dict)
    #: every point of this device is personal data (an apartment's meter), whatever the shared profile says
    personal: bool = False

    def point_infos(self, profile: StrictModel) -> list[PointInfo]:
        assert isinstance(profile, SimulatorProfile)
        return profile_point_infos(
            self.id,
            profile.points,
            measurement=profile.model,
            base_tags={"device": self.id, **self.tags},
            personal=self.personal,
            unit_of=lambda spec: spec.unit,
            rating_of=lambda spec: spec.max_power_kw,
        )
