"""Config models of the MQTT sensor driver (PLACEHOLDER: issue #4 replaces this with the full schema).

Imports no protocol library.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from gateway.config.types import Ident, StrictModel
from gateway.registry import PointInfo


class MqttSourceConfig(StrictModel):
    id: Ident
    host: str
    port: int = 1883


class MqttDeviceConfig(StrictModel):
    profile_model: ClassVar[type[StrictModel] | None] = None

    id: Ident
    driver: Literal["mqtt"]
    source: Ident
    points: dict[Ident, dict[str, object]] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)

    def point_infos(self, profile: StrictModel | None) -> list[PointInfo]:
        return [PointInfo(id=f"{self.id}.{name}", measurement="mqtt") for name in self.points]
