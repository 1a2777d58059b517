"""Units a payload may state, and the conversions between them.

Owns: ``canonical_unit`` (the spellings formats use, ``C``/``Cel``/``°C``, reduced to one name), ``conversion``
(the function taking a value from one unit to another of the same dimension, or ``None`` when there is none) and
``UnitMismatch`` (why a sample was refused). Pure arithmetic: imports nothing of the gateway or any protocol library.

Every conversion is affine, ``to = from * scale + offset``, through one base unit per dimension, so the table holds
one (scale, offset) pair per unit rather than one per pair of units, and a round trip is exact up to floating point.
A unit outside the table converts only to itself (the same spelling after canonicalisation): a payload in ``lx``
for a point in ``lx`` passes, a payload in ``lx`` for a point in ``%`` is refused. Nothing is ever passed on with a
unit the point was not configured with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NamedTuple


class _Unit(NamedTuple):
    dimension: str
    #: value in the dimension's base unit = value * scale + offset
    scale: float
    offset: float = 0.0


#: canonical name -> (dimension, to-base scale, to-base offset); base units: K, Wh, W, Pa, ppm
UNITS: Final[dict[str, _Unit]] = {
    "°C": _Unit("temperature", 1.0, 273.15),
    "°F": _Unit("temperature", 5.0 / 9.0, 459.67 * 5.0 / 9.0),
    "K": _Unit("temperature", 1.0),
    "Wh": _Unit("energy", 1.0),
    # Shelly Gen1 reports relay energy in watt-minutes (shellies/<id>/relay/0/energy)
    "Wmin": _Unit("energy", 1.0 / 60.0),
    "kWh": _Unit("energy", 1e3),
    "MWh": _Unit("energy", 1e6),
    "W": _Unit("power", 1.0),
    "kW": _Unit("power", 1e3),
    "Pa": _Unit("pressure", 1.0),
    "hPa": _Unit("pressure", 100.0),
    "kPa": _Unit("pressure", 1e3),
    "ppm": _Unit("fraction", 1.0),
}

#: spellings seen in payloads and configs (Tasmota ``TempUnit: "C"``, SenML ``Cel``, ``degC``, ``mbar``)
_ALIASES: Final[dict[str, str]] = {
    "c": "°C",
    "cel": "°C",
    "degc": "°C",
    "°c": "°C",
    "℃": "°C",
    "celsius": "°C",
    "f": "°F",
    "degf": "°F",
    "°f": "°F",
    "℉": "°F",
    "fahrenheit": "°F",
    "k": "K",
    "kelvin": "K",
    "wh": "Wh",
    "wmin": "Wmin",
    "w·min": "Wmin",
    "w*min": "Wmin",
    "kwh": "kWh",
    "mwh": "MWh",
    "w": "W",
    "kw": "kW",
    "pa": "Pa",
    "hpa": "hPa",
    "mbar": "hPa",
    "kpa": "kPa",
    "ppm": "ppm",
    # SenML's relative humidity; a humidity point is written "%" in configs
    "%rh": "%",
}

Conversion = Callable[[float], float]


class UnitMismatch(ValueError):
    """A value whose unit cannot be converted to the point's: the sample is refused, never passed on."""


def canonical_unit(text: str) -> str:
    """The table's name for a unit spelling; a unit outside the table is returned stripped, as written."""
    stripped = text.strip()
    return _ALIASES.get(stripped.lower(), stripped)


def _identity(value: float) -> float:
    return value


def conversion(source: str, target: str) -> Conversion:
    """The function converting a value in ``source`` to ``target`` (both canonical); raises UnitMismatch."""
    if source == target:
        return _identity
    have, want = UNITS.get(source), UNITS.get(target)
    if have is None or want is None:
        raise UnitMismatch(f"no conversion from {source!r} to {target!r}")
    if have.dimension != want.dimension:
        raise UnitMismatch(f"{source!r} ({have.dimension}) cannot be converted to {target!r} ({want.dimension})")
    # value_base = v * a1 + b1; target = (value_base - b2) / a2: folded into one multiply-add
    scale = have.scale / want.scale
    offset = (have.offset - want.offset) / want.scale
    if offset == 0.0:
        return lambda value: value * scale
    return lambda value: value * scale + offset


def convert(value: float, source: str, target: str) -> float:
    """``value`` in unit ``source`` expressed in ``target`` (any spelling); raises UnitMismatch."""
    return conversion(canonical_unit(source), canonical_unit(target))(value)
