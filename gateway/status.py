"""Typed status the gateway's parts hand the supervisor, and the snapshot the HTTP views and /metrics read.

Owns the shapes only (no behaviour): ``UplinkStatus`` (what an uplink runner reports), ``UplinkState``.
Must never import the supervisor, a driver or a protocol library.
"""

from __future__ import annotations

from typing import Literal, TypedDict

#: what ``UplinkRunner.state`` moves through: starting -> up <-> retrying -> stopped
UplinkState = Literal["starting", "up", "retrying", "stopped"]


class UplinkStatus(TypedDict):
    """One uplink's queue figures for /api/uplinks and /metrics (``UplinkRunner.status``)."""

    name: str
    state: UplinkState
    backlog_samples: int
    backlog_events: int
    replaying: bool
    oldest_age_s: float
    sent_samples: int
    sent_events: int
    replayed_samples: int
    dropped_samples: int
    quarantined: int
    requests_ok: int
    requests_failed: int
    in_flight: int
    retry_in_s: float
    last_error: str | None
