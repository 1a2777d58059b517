"""The building aggregate: the sum of the household meters, the one form in which they reach the platform outside
incentive records (``privacy.building_aggregate`` in the site file, docs/privacy.md).

Owns ``BuildingAggregate``: fed from the bus (a tap: the latest good reading of each meter), asked by the
supervisor's ticker once a second, it answers one sample per period boundary, stamped with the boundary. That
sample is an ordinary, non-personal point: stored, shown, sent to every uplink like any reading.

Why it is careful: a sum hides a household only if the set of households in it never changes and the sum is not
refreshed after each single reading. So the sum is sent once per period (the difference of two sums is then the
whole building's consumption over the period), and only when every meter has a good reading within ``max_age``;
otherwise that period is skipped (logged once when it starts and once when it ends), never sent over fewer meters.
A meter added to or removed from the site file changes the set once: the difference across that restart is that
meter's reading. Imports nothing but the model and the config.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway.model import Quality, Sample

if TYPE_CHECKING:
    from gateway.config.site import BuildingAggregateConfig, Site

log = logging.getLogger(__name__)


class BuildingAggregate:
    def __init__(self, config: BuildingAggregateConfig, meters: Sequence[str]) -> None:
        if len(set(meters)) < config.min_meters:
            raise ValueError(f"a building aggregate needs at least {config.min_meters} meters, got {len(set(meters))}")
        self.point = config.point
        self.meters = tuple(dict.fromkeys(meters))
        self._members = frozenset(self.meters)
        self.every_ns = round(config.every * 1e9)
        self.max_age_ns = round(config.freshness * 1e9)
        #: meter -> (value, ts) of its latest GOOD reading; a BAD or UNCERTAIN reading removes it
        self.latest: dict[str, tuple[float, int]] = {}
        self._next_ns: int | None = None
        self.sent = 0
        self.skipped = 0
        self._paused_by: str | None = None

    @property
    def next_ns(self) -> int | None:
        """When the next sum is due (None before the first tick): the status page says when the first one comes."""
        return self._next_ns

    def update(self, batch: Sequence[Sample]) -> None:
        """Bus tap: remember each meter's latest good reading (called for every batch, so it stays small)."""
        members = self._members
        for sample in batch:
            if sample.point not in members:
                continue
            value = sample.value
            if (
                sample.quality is Quality.GOOD
                and isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                self.latest[sample.point] = (float(value), sample.ts)
            else:
                self.latest.pop(sample.point, None)  # an unusable reading: this meter is not current any more

    def tick(self, now_ns: int) -> list[Sample]:
        """At most one sample: the sum at the last period boundary, once that boundary has passed."""
        boundary = now_ns - now_ns % self.every_ns
        if self._next_ns is None:
            self._next_ns = boundary + self.every_ns  # the first full period after start
            return []
        if now_ns < self._next_ns:
            return []
        self._next_ns = boundary + self.every_ns
        oldest = boundary - self.max_age_ns
        missing = next((m for m in self.meters if m not in self.latest or self.latest[m][1] < oldest), None)
        if missing is not None:
            self.skipped += 1
            if self._paused_by is None:
                log.warning(
                    "building aggregate %s not sent: %s has no good reading in the last %gs (the sum is sent only "
                    "when all %d meters report)",
                    self.point,
                    missing,
                    self.max_age_ns / 1e9,
                    len(self.meters),
                )
            self._paused_by = missing
            return []
        if self._paused_by is not None:
            log.info("building aggregate %s sent again: all %d meters report", self.point, len(self.meters))
            self._paused_by = None
        total = round(math.fsum(self.latest[m][0] for m in self.meters), 6)
        self.sent += 1
        return [Sample(self.point, total, boundary, Quality.GOOD)]


def build_aggregate(site: Site) -> BuildingAggregate | None:
    """The site's building aggregate, or None when ``privacy.building_aggregate`` is not configured."""
    from gateway.config.site import aggregate_meters

    config = site.config.privacy.building_aggregate
    if config is None:
        return None
    return BuildingAggregate(config, aggregate_meters(site.config))
