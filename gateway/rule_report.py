"""What operators are told about the rules besides each rule's state: the engine's recent problems, each marked
resolved once the engine says its condition is over, and the result of the last rule reload.

Owns ``RuleProblemLog`` and ``ReloadResult``. The supervisor feeds them; ``gateway.http.views`` reads them for the
status page, ``/api/rules`` and ``edge-gateway status``. Must never import the rules engine (the supervisor loads it
only for a site with rule files): a problem is read by its attributes (``subject``, ``message``, ``ts``,
``ongoing``), the shape of ``rules.runtime.Problem``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.errors import Diagnostic

#: how many problems the log keeps (the page shows the last ten)
PROBLEM_LOG_LIMIT = 50


def clock(ts_ns: int) -> str:
    """``HH:MM:SS`` in the gateway's local time, the way the page and ``status`` print a problem's time."""
    return time.strftime("%H:%M:%S", time.localtime(ts_ns / 1e9))


@dataclass(slots=True)
class LoggedProblem:
    subject: str
    message: str
    ts: int
    #: a condition (inputs missing, a failed rule) rather than a single happening (a refused write)
    ongoing: bool
    resolved_ns: int | None = None
    #: how it ended ("computed again", "superseded", "rules reloaded")
    resolution: str = ""

    def __str__(self) -> str:
        return f"{clock(self.ts)} {self.subject}: {self.message}"

    def resolved_text(self) -> str:
        assert self.resolved_ns is not None
        return f"{self} (resolved {clock(self.resolved_ns)}: {self.resolution})"


class RuleProblemLog:
    """The engine reports a problem once, when it starts; a condition is marked resolved when the engine reports it
    over, so a rule that waited a second for its first inputs at start-up does not stay on the page as a problem."""

    def __init__(self, limit: int = PROBLEM_LOG_LIMIT) -> None:
        self.limit = limit
        self.entries: list[LoggedProblem] = []

    def add(self, problem: Any) -> None:
        ts = int(getattr(problem, "ts", 0) or time.time_ns())
        entry = LoggedProblem(
            subject=str(getattr(problem, "subject", "rules")),
            message=str(getattr(problem, "message", problem)),
            ts=ts,
            ongoing=bool(getattr(problem, "ongoing", False)),
        )
        if entry.ongoing:
            # a new condition of the same subject (now waiting for fewer inputs, say) replaces the old one
            self.resolve(entry.subject, ts, "superseded")
        self.entries.append(entry)
        del self.entries[: -self.limit]

    def resolve(self, subject: str, ts: int, resolution: str) -> None:
        for entry in self.entries:
            if entry.ongoing and entry.resolved_ns is None and entry.subject == subject:
                entry.resolved_ns = ts
                entry.resolution = resolution

    def resolve_all(self, ts: int, resolution: str) -> None:
        """A new rule runtime took over (reload): it reports again whatever is still wrong."""
        for entry in self.entries:
            if entry.ongoing and entry.resolved_ns is None:
                entry.resolved_ns = ts
                entry.resolution = resolution

    def open(self) -> list[LoggedProblem]:
        """Problems still current (conditions not over) and single happenings, oldest first."""
        return [entry for entry in self.entries if entry.resolved_ns is None]

    def resolved(self) -> list[LoggedProblem]:
        return [entry for entry in self.entries if entry.resolved_ns is not None]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The outcome of the last rule reload (SIGHUP or an edited rule file); kept until the next reload."""

    accepted: bool
    ts: int
    files: tuple[str, ...]
    message: str
    diagnostics: tuple[Diagnostic, ...] = ()

    @classmethod
    def ok(cls, files: Iterable[object], ts: int) -> ReloadResult:
        names = tuple(str(f) for f in files)
        return cls(True, ts, names, f"rules reloaded from {len(names)} file(s)")

    @classmethod
    def refused(
        cls, files: Iterable[object], ts: int, diagnostics: Sequence[Diagnostic], reason: str = ""
    ) -> ReloadResult:
        count = len(diagnostics)
        what = reason or (f"{count} error{'' if count == 1 else 's'}" if count else "an error")
        return cls(
            False,
            ts,
            tuple(str(f) for f in files),
            f"reload refused ({what}): the previous rules keep running",
            tuple(diagnostics),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "ts": self.ts,
            "files": list(self.files),
            "message": self.message,
            "diagnostics": [
                {
                    "file": d.file,
                    "line": d.line,
                    "col": d.col,
                    "message": d.message,
                    "position": f"{d.file}:{d.line}:{d.col}",
                }
                for d in self.diagnostics
            ],
        }
