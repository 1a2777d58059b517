"""The gateway's exception tree. Library errors are translated into these at one boundary per library.

::

    GatewayError
    ├── ConfigError            a config, profile or rule file is invalid (carries every Diagnostic found)
    ├── DeviceError            raised by drivers
    │   ├── DeviceUnavailable  timeout, disconnect, no route: retry later
    │   ├── DeviceRejected     the device answered with an exception code (Modbus) or refused the request
    │   └── WriteRejected      a write refused before it reached the device (not writable, out of bounds, allowlist)
    ├── UplinkError            raised by uplinks; ``retryable`` says whether sending the same batch again can work
    ├── StoreError             the outbox cannot be opened or written (disk full, read-only, corrupt)
    └── DataDirBusy            another gateway process holds the data directory's lock


    └── StoreError             the outbox cannot be opened or written (disk full, read-only, corrupt)

A TaskGroup reports its failures as a (Base)ExceptionGroup, nested when task groups are nested. ``task_group_error``
is the one place such a group is turned back into the GatewayError it stands for, so a refusal raised inside a
TaskGroup reaches the command line as its one line and exit code. It is used with a plain ``except
BaseExceptionGroup``, never by raising from inside ``except*``: before Python 3.11.4 (Debian 12 ships 3.11.2) an
exception raised in an ``except*`` clause is wrapped in a new ExceptionGroup (CPython gh-103590).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


#: a key whose value is a secret, in an echoed line: ``password:``, ``api_token:``, ``"secret":`` (not ``*_file:``).
#: Anchored at the start of a word so a hostile one-line file is scanned in linear time (no backtracking per column).
_SECRET_KEY = re.compile(r"""(?<![\w"'-])["']?[\w-]*?(?:password|token|secret|key)["']?[ \t]*:[ \t]*""", re.IGNORECASE)
#: a quoted value after it (unterminated on this line: to the end of the line)
_QUOTED = re.compile(r""""(?:[^"\\]|\\.)*"?|'(?:[^']|'')*'?""")
_FLOW_END = re.compile(r"[,}\]]| #")
MASK = '"****"'
#: an echoed line is cut to this many characters around the column (a hostile file can be one 1 MiB line)
ECHO_WIDTH = 160


def mask_secrets(line: str) -> tuple[str, list[tuple[int, int, int]]]:
    """``line`` with the value of every secret-named key replaced by ``"****"``, literal or ``${ENV}`` alike, and the
    replaced spans as (start, old end, new end) so a caret can be moved with the text. Linear in the line's length."""
    out: list[str] = []
    length = 0
    spans: list[tuple[int, int, int]] = []
    pos = 0
    brackets = [i for i in (line.find("{"), line.find("[")) if i >= 0]
    flow_from = min(brackets) if brackets else len(line)
    for match in _SECRET_KEY.finditer(line):
        start = match.end()
        if match.start() < pos or start >= len(line) or line[start] in "|>{[&*#":
            continue  # no value on this line (a block scalar or collection follows): nothing to hide here
        quoted = _QUOTED.match(line, start)
        if quoted is not None:
            end = quoted.end()
        else:
            # a plain scalar ends at a comment, and inside a flow collection also at , } or ]
            if match.start() > flow_from:
                stop = _FLOW_END.search(line, start)
                end = stop.start() if stop is not None else len(line)
            else:
                comment = line.find(" #", start)  # a block value runs to the end: this key is the line's last
                end = comment if comment >= 0 else len(line)
            while end > start and line[end - 1] in " \t":
                end -= 1
        if end == start:
            continue
        out.append(line[pos:start])
        length += start - pos
        spans.append((start, end, length + len(MASK)))
        out.append(MASK)
        length += len(MASK)
        pos = end
    out.append(line[pos:])
    return "".join(out), spans


def _moved(col: int, spans: list[tuple[int, int, int]]) -> int:
    """A 0-based column of the original line, in the masked line."""
    shift = 0
    for start, old_end, new_end in spans:
        if col >= old_end:
            shift = new_end - old_end
        elif col >= start:
            return start + shift
    return col + shift


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem in one file, positioned for a human: ``file:line:col: message`` plus the offending line.

    ``line`` and ``col`` are 1-based; 0 means "the whole file" (printed as ``file: message``, without a position).
    ``format`` is the one place a config line is echoed: the values of secret-named keys are masked there, and a
    long line is cut around the column.
    A ``warning`` is printed as such and does not fail a check (except ``check --strict``).
    """

    file: str
    line: int
    col: int
    message: str
    source_line: str | None = None
    severity: Literal["error", "warning"] = "error"

    def format(self) -> str:
        kind = "warning: " if self.severity == "warning" else ""
        where = f"{self.file}:{self.line}:{self.col}" if self.line else self.file  # 0: the whole file, no place
        head = f"{where}: {kind}{self.message}"
        if self.source_line is None or self.line == 0:
            return head
        text, spans = mask_secrets(self.source_line.rstrip())
        caret = _moved(max(self.col - 1, 0), spans)
        if len(text) > ECHO_WIDTH:
            first = max(0, min(caret - ECHO_WIDTH // 2, len(text) - ECHO_WIDTH))
            text = ("..." if first else "") + text[first : first + ECHO_WIDTH] + "..."
            caret = caret - first + (3 if first else 0)
        # a tab in the echoed line is echoed as a tab under it too, so the caret lands where the terminal shows it
        pad = "".join("\t" if char == "\t" else " " for char in text[:caret])
        return f"{head}\n    {text}\n    {pad}^"


class ConfigError(GatewayError):
    """One or more diagnostics; ``str()`` prints all of them, one block each."""

    def __init__(self, diagnostics: Iterable[Diagnostic]) -> None:
        self.diagnostics = list(diagnostics)
        super().__init__("\n".join(d.format() for d in self.diagnostics))


class DeviceError(GatewayError):
    """A device could not be read or written."""


class DeviceUnavailable(DeviceError):
    """The device did not answer (timeout, refused connection, lost link). Retrying later may work."""


class DeviceRejected(DeviceError):
    """The device answered but refused the request (e.g. Modbus exception code 2, illegal data address)."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class WriteRejected(DeviceError):
    """A write was refused by the gateway itself and never sent to the device."""


class UplinkError(GatewayError):
    """An uplink could not deliver a batch."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class StoreError(GatewayError):
    """The outbox could not be opened or written."""


class DataDirBusy(GatewayError):
    """Another gateway process holds ``<data_dir>/gateway.lock``: two on one outbox would deliver everything twice."""


def leaf_exceptions(error: BaseException) -> list[BaseException]:
    """The exceptions inside ``error``, depth first, with every (nested) exception group flattened away."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaf_exceptions(inner)]
    return [error]


def task_group_error(group: BaseExceptionGroup[BaseException]) -> GatewayError | None:
    """The one GatewayError a task-group failure stands for, or None when it stands for something else (a bug).

    One GatewayError (however deeply nested) is returned as itself; several ConfigErrors (the same kind of refusal,
    e.g. two parts rejecting the config at start) are merged into one ConfigError carrying all their diagnostics.
    Anything else, or a mix, is None: the caller re-raises the group, whose traceback is then the useful report.
    Use it as ``except BaseExceptionGroup as group: error = task_group_error(group); if error is None: raise;
    raise error from None``.
    """
    leaves = leaf_exceptions(group)
    if len(leaves) == 1 and isinstance(leaves[0], GatewayError):
        return leaves[0]
    if leaves and all(isinstance(leaf, ConfigError) for leaf in leaves):
        return ConfigError(d for leaf in leaves if isinstance(leaf, ConfigError) for d in leaf.diagnostics)
    return None
