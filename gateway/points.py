"""A device's ``PointInfo`` list, built once from its profile's points for every driver that has profiles.

Owns ``profile_point_infos``: the Modbus, BACnet and simulator device configs each describe their points the same
way (id ``device.point``, the device's base tags under the point's own, personal if the device or the point says
so), and differ only in where a point keeps its unit, tags and meter rating. Imports no protocol library and nothing
of ``drivers/`` (config must stay cheap to load, and the core must not know the drivers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

from gateway.registry import PointInfo, ValueKind

__all__ = ["ProfilePoint", "profile_point_infos"]


class ProfilePoint(Protocol):
    """What every driver's profile point states in ``PointInfo``'s own terms."""

    @property
    def kind(self) -> ValueKind: ...
    @property
    def writable(self) -> bool: ...
    @property
    def min(self) -> float | None: ...
    @property
    def max(self) -> float | None: ...
    @property
    def description(self) -> str | None: ...
    @property
    def personal(self) -> bool: ...


SpecT = TypeVar("SpecT", bound=ProfilePoint)


def profile_point_infos(
    device: str,
    points: Mapping[str, SpecT],
    *,
    measurement: str,
    base_tags: dict[str, str],
    personal: bool,
    unit_of: Callable[[SpecT], str | None],
    tags_of: Callable[[SpecT], Mapping[str, str]] | None = None,
    rating_of: Callable[[SpecT], float | None] | None = None,
) -> list[PointInfo]:
    """One ``PointInfo`` per point of ``points`` (name -> spec), in the profile's order.

    ``base_tags`` become the tags of every point that has none of its own: one dict shared by the device's points
    rather than a copy each, because a site of thousands of points kept thousands of equal dicts (PointInfo is
    frozen and every reader of ``tags`` copies before it adds, so sharing is safe; the caller hands over the dict
    and must not change it afterwards). ``tags_of`` (None: points have no tags) and ``rating_of`` (None: no meter
    rating) read what only some profiles have; ``unit_of`` is the unit in the gateway's words."""
    infos: list[PointInfo] = []
    for name, spec in points.items():
        own_tags = tags_of(spec) if tags_of is not None else None
        infos.append(
            PointInfo(
                id=f"{device}.{name}",
                unit=unit_of(spec),
                kind=spec.kind,
                writable=spec.writable,
                min=spec.min,
                max=spec.max,
                description=spec.description,
                max_power_kw=rating_of(spec) if rating_of is not None else None,
                measurement=measurement,
                tags={**base_tags, **own_tags} if own_tags else base_tags,
                personal=personal or spec.personal,
            )
        )
    return infos
