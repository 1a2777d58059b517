"""Config models of the Modbus driver (PLACEHOLDER: issue #3 replaces this with the full register-map schema).

Imports no protocol library.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from gateway.config.types import Ident, PositiveDuration, StrictModel
from gateway.registry import PointInfo


class ModbusProfile(StrictModel):
    driver: Literal["modbus"]
    vendor: str
    model: str
    points: dict[Ident, dict[str, object]]


class ModbusBusConfig(StrictModel):
    id: Ident
    type: Literal["tcp", "rtu"]


class ModbusDeviceConfig(StrictModel):
    profile_model: ClassVar[type[StrictModel]] = ModbusProfile

    id: Ident
    driver: Literal["modbus"]
    profile: str
    bus: Ident
    unit: int = Field(ge=0, le=247)
    poll: PositiveDuration = 1.0
    tags: dict[str, str] = Field(default_factory=dict)

    def point_infos(self, profile: StrictModel) -> list[PointInfo]:
        assert isinstance(profile, ModbusProfile)
        return [PointInfo(id=f"{self.id}.{name}", measurement=profile.model.lower()) for name in profile.points]
