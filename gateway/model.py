"""Core value types that travel through the gateway: samples, commands and events.

Owns: ``Sample``, ``Quality``, ``Command``, ``Event`` and the point-id grammar. Imports nothing from the rest of the
gateway and no protocol library: every other module may import this one.

``Sample`` is a NamedTuple rather than a dataclass because it is created once per value read on the hot path:
tuple construction is the cheapest immutable record Python has, and it is hashable and picklable for free.
"""

from __future__ import annotations

import re
from enum import IntEnum
from typing import Any, NamedTuple

#: one identifier: a device id, or the point part of a point id
IDENT_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
#: ``device.point``; both halves lowercase identifiers so a rule expression can name them
POINT_ID_RE = re.compile(r"[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*\Z")

Value = float | int | bool | str


class Quality(IntEnum):
    """How far a sample can be trusted. Ordered: a larger number is worse."""

    GOOD = 0
    UNCERTAIN = 1  # out of range, stale, or a substituted value
    BAD = 2  # communication failure: the value is meaningless and is never written to the TSDB


class Sample(NamedTuple):
    """One value of one point, stamped by the driver when it was read.

    ``ts`` is Unix nanoseconds (``time.time_ns()``). A BAD sample carries ``value=None`` and, where the driver
    knows it, ``reason``: why there is no value (``no_answer``, ``link_down``, ``disabled``, ``exception_2``,
    ``offline``, ...), so an outage is explicit interval by interval in the store and downstream.
    """

    point: str
    value: Value | None
    ts: int
    quality: Quality = Quality.GOOD
    reason: str | None = None


class Command(NamedTuple):
    """A request to write ``value`` to ``point``. ``origin`` is a rule id, ``platform`` or ``cli``.

    ``priority`` is the BACnet priority slot (1-16) named by the point's allowlist entry, None for the driver's
    own (a BACnet point's profile priority); the allowlist fills it in (``rules.loader.Allowlist.check``), so a
    sender cannot pick a slot, and a driver without priorities refuses a command that carries one. ``relinquish``
    asks to release that slot (BACnet: write NULL at that priority) instead of writing a value; ``value`` is then
    None, and the allowlist entry must permit it.
    """

    point: str
    value: Value | None
    origin: str
    priority: int | None = None
    relinquish: bool = False


class Event(NamedTuple):
    """An alarm, rule notification or incentive record.

    ``id`` is unique and stable across retries: downstream systems deduplicate on it. ``body`` must be
    JSON-serialisable (orjson) and is treated as immutable once created.
    """

    id: str
    type: str
    subject: str
    ts: int
    body: dict[str, Any]


def is_point_id(text: str) -> bool:
    return POINT_ID_RE.match(text) is not None


def is_ident(text: str) -> bool:
    return IDENT_RE.match(text) is not None


def split_point_id(point: str) -> tuple[str, str]:
    """``"zone3.co2"`` -> ``("zone3", "co2")``; raises ValueError for anything that is not a point id."""
    if not is_point_id(point):
        raise ValueError(f"not a point id (device.point, lowercase identifiers): {point!r}")
    device, _, name = point.partition(".")
    return device, name
