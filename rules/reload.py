"""Hot reload of rule files: validate the new set first, then take over the old runtime's state.

Owns ``RuleFileWatcher`` (polls modification times; no new dependency and nothing to go wrong with inotify limits
on a Pi) and re-exports ``reload`` (defined beside ``RuleRuntime``, whose private state it carries over). The swap
itself is the caller's: it replaces its reference between two batches, so no sample is processed by neither runtime.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from rules.runtime import reload

__all__ = ["POLL_INTERVAL_S", "RuleFileWatcher", "reload"]

#: how often the supervisor should call ``RuleFileWatcher.changed`` (seconds)
POLL_INTERVAL_S = 2.0


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
