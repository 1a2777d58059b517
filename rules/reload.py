"""Hot reload of rule files: validate the new set first, then take over the old runtime's state.

Owns ``reload`` (called by the supervisor on SIGHUP or a file change) and ``RuleFileWatcher`` (polls modification
times; no new dependency and nothing to go wrong with inotify limits on a Pi). The swap itself is the caller's: it
replaces its reference between two batches, so no sample is processed by neither runtime.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from gateway.registry import PointInfo
from rules.runtime import RuleRuntime
from rules.state import RuleStateStore

#: how often the supervisor should call ``RuleFileWatcher.changed`` (seconds)
POLL_INTERVAL_S = 2.0


def reload(
    old: RuleRuntime,
    files: Sequence[Path],
    registry: Mapping[str, PointInfo],
    *,
    timezone: str,
    state: RuleStateStore | None,
) -> RuleRuntime:
    """Load ``files`` into a new runtime that carries over ``old``'s values, windows, timers and latches.

    Raises ``ConfigError`` (every problem, positioned) and leaves ``old`` untouched when the new files are invalid.
    ``registry`` may still hold the old rule set's derived points: they are set aside, so a rule that names a
    derived point the new files removed is an error rather than a point that never gets a value.
    """
    produced = {info.id for info in old.derived_points()}
    devices_only = {point: info for point, info in registry.items() if point not in produced or info.physical}
    new = RuleRuntime.load(files, devices_only, timezone=timezone, state=state)
    new.replace(old)
    return new


class RuleFileWatcher:
    """``changed()`` is True once after any watched file was modified, created or deleted."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = tuple(Path(f) for f in files)
        self._seen = self._snapshot()

    def _snapshot(self) -> tuple[tuple[int, int, int] | None, ...]:
        out: list[tuple[int, int, int] | None] = []
        for path in self.files:
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)
                continue
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def changed(self) -> bool:
        now = self._snapshot()
        if now == self._seen:
            return False
        self._seen = now
        return True
