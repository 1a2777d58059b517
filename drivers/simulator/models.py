"""Simulated building signals: pure functions of (seed, time), so a demo run is reproducible and restart-safe.

The energy counter is the integral of the power signal, computed in closed form: it never decreases, survives a
restart of the gateway (it depends only on the clock), and matches the power readings, as a real meter's would.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from gateway.model import Value

DAY = 86400.0
_T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: the simulated meters were installed then


def _office_occupancy(local: datetime, capacity: int, rng: random.Random) -> int:
    """People in an office zone: none at night and at weekends, a morning ramp, a lunch dip."""
    if local.weekday() >= 5:
        return 0
    hour = local.hour + local.minute / 60
    if hour < 7.5 or hour > 19:
        return 0
    shape = min(1.0, (hour - 7.5) / 1.5, (19 - hour) / 1.5)
    if 12 <= hour < 13:
        shape *= 0.6
    return max(0, round(capacity * shape * rng.uniform(0.8, 1.0)))


@dataclass(slots=True)
class EnergyMeterModel:
    seed: int
    scale: float
    tz: ZoneInfo
    mean_kw: float = field(init=False)
    daily_kw: float = field(init=False)
    fast_kw: float = field(init=False)
    phase: float = field(init=False)
    base_kwh: float = field(init=False)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.mean_kw = self.scale * rng.uniform(0.6, 1.4)
        self.daily_kw = self.mean_kw * rng.uniform(0.3, 0.6)  # < mean: power stays positive, the counter rises
        self.fast_kw = self.mean_kw * 0.15
        self.phase = rng.uniform(0, 2 * math.pi)
        self.base_kwh = rng.uniform(1_000, 50_000)

    def energy_kwh(self, t: float) -> float:
        # integral of power_kw over [T0, t] in hours
        w_day, w_fast = 2 * math.pi / DAY, 2 * math.pi / 600
        elapsed = t - _T0
        integral = (
            self.mean_kw * elapsed
            + self.daily_kw / w_day * (math.sin(w_day * t + self.phase) - math.sin(w_day * _T0 + self.phase))
            + self.fast_kw / w_fast * (math.sin(w_fast * t) - math.sin(w_fast * _T0))
        )
        return self.base_kwh + integral / 3600.0

    def power_kw(self, t: float) -> float:
        w_day, w_fast = 2 * math.pi / DAY, 2 * math.pi / 600
        return self.mean_kw + self.daily_kw * math.cos(w_day * t + self.phase) + self.fast_kw * math.cos(w_fast * t)

    def read(self, t: float, rng: random.Random) -> dict[str, Value]:
        power = self.power_kw(t)
        voltage = 230.0 + rng.gauss(0, 1.2)
        pf = min(0.99, 0.93 + rng.gauss(0, 0.01))
        return {
            "power_kw": round(power, 3),
            "energy_kwh": round(self.energy_kwh(t), 3),
            "voltage": round(voltage, 1),
            "current": round(power * 1000 / (3 * voltage * pf), 2),
            "pf": round(pf, 3),
        }


@dataclass(slots=True)
class ZoneModel:
    seed: int
    scale: float
    tz: ZoneInfo
    capacity: int = field(init=False)
    co2: float = 450.0
    temperature: float = 22.0
    last_t: float | None = None

    def __post_init__(self) -> None:
        self.capacity = max(1, round(random.Random(self.seed).randint(8, 30) * self.scale))

    def read(self, t: float, rng: random.Random) -> dict[str, Value]:
        local = datetime.fromtimestamp(t, self.tz)
        occupancy = _office_occupancy(local, self.capacity, rng)
        dt = 1.0 if self.last_t is None else max(0.0, min(t - self.last_t, 600.0))
        self.last_t = t
        # CO2 relaxes toward a level set by occupancy (about 25 ppm per person above outdoor air).
        target_co2 = 420 + occupancy * 25 * 30 / self.capacity * 2.5
        self.co2 += (target_co2 - self.co2) * min(1.0, dt / 300)
        target_temp = 21.0 + occupancy * 0.08 + 1.5 * math.sin(2 * math.pi * (local.hour - 9) / 24)
        self.temperature += (target_temp - self.temperature) * min(1.0, dt / 900)
        return {
            "temperature": round(self.temperature + rng.gauss(0, 0.05), 2),
            "co2": round(self.co2 + rng.gauss(0, 5), 1),
            "occupancy": occupancy,
            "humidity": round(45 + 5 * math.sin(2 * math.pi * t / DAY) + rng.gauss(0, 0.3), 1),
        }


@dataclass(slots=True)
class AhuModel:
    seed: int
    scale: float
    tz: ZoneInfo
    vent_setpoint_pct: float = 40.0

    def read(self, t: float, rng: random.Random) -> dict[str, Value]:
        fan = min(100.0, 20 + self.vent_setpoint_pct * 0.7)
        return {
            "supply_temp": round(17.5 + rng.gauss(0, 0.1), 2),
            "fan_speed_pct": round(fan + rng.gauss(0, 0.5), 1),
            "vent_setpoint_pct": self.vent_setpoint_pct,
            # the filter loads slowly over the year: a maintenance rule can watch it
            "filter_dp_pa": round(80 + (t - _T0) / DAY * 0.4 + fan * 0.5 + rng.gauss(0, 1), 1),
        }

    def write(self, point: str, value: float) -> None:
        if point != "vent_setpoint_pct":
            raise KeyError(point)
        self.vent_setpoint_pct = float(value)


Model = EnergyMeterModel | ZoneModel | AhuModel
MODELS: dict[str, type[EnergyMeterModel] | type[ZoneModel] | type[AhuModel]] = {
    "energy_meter": EnergyMeterModel,
    "zone": ZoneModel,
    "ahu": AhuModel,
}
