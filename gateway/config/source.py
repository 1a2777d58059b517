"""Strict YAML loading that remembers where every value came from.

The loader differs from ``yaml.safe_load`` on purpose:

* YAML 1.1 booleans (``on``/``off``/``yes``/``no``) stay strings: only ``true``/``false`` are booleans, so a
  device named ``no`` or a value ``off`` is never silently turned into ``False``.
* Duplicate mapping keys are errors (PyYAML keeps the last one silently); the first value is kept so validation
  can go on and report the file's other problems with it.
* Every mapping key and value gets a position, so a pydantic error at ``("devices", 3, "poll")`` is printed as
  ``site.yaml:17:11: ...`` with the offending line.
* Hostile files are refused in bounded time and memory, before anything is built from them: a file over
  ``MAX_FILE_BYTES`` is refused unread, an anchor or alias (``&a`` / ``*a``, the billion-laughs expansion) is refused
  at its line, and so is a collection nested deeper than ``MAX_DEPTH`` or a value past the first ``MAX_NODES``.
  Site files, device profiles and rule files (also on hot reload) all come through ``load_yaml``, so these bounds
  hold for every YAML the gateway reads.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from gateway.config.types import Rejected, StrictModel
from gateway.errors import ConfigError, Diagnostic

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)

#: no config, profile or rule file comes near this; a bigger one is refused before it is read
MAX_FILE_BYTES = 1024 * 1024
#: deepest nesting of mappings and sequences (shipped files use under 10); also keeps the recursive composer and
#: ``_build`` far from Python's recursion limit
MAX_DEPTH = 64
#: most values (scalars, mappings, sequences) in one file; the largest shipped file has a few hundred. PyYAML's
#: pure-Python parser needs about 1 KiB and 25 µs per value, so this bounds memory where the byte size cannot
MAX_NODES = 50_000
NO_ALIASES = "YAML anchors and aliases are not allowed (they can expand without limit)"


class _Refused(yaml.MarkedYAMLError):
    """A well-formed YAML construct our config files do not allow; ``problem`` is the whole message."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-style booleans, no anchors or aliases, at most ``MAX_DEPTH`` levels and ``MAX_NODES``
    values."""

    _depth = 0
    _nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # Checked on the event stream, before the composer builds (or shares) a node: an alias never reaches _build,
        # where a shared node would be expanded once per reference.
        event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
        mark = event.start_mark if isinstance(event.start_mark, yaml.Mark) else None
        if isinstance(event, yaml.AliasEvent):
            # anchors are refused where they stand, so an alias that gets here names none: most often text that
            # starts with '*' (a wildcard, a footnote) and was meant as text
            name = f"*{event.anchor}"
            message = f'{NO_ALIASES}: {name} is an alias; if it is text, quote it: "{name}"'
            raise _Refused(problem=message, problem_mark=mark)
        if getattr(event, "anchor", None) is not None:
            raise _Refused(problem=NO_ALIASES, problem_mark=mark)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(problem=f"more than {MAX_NODES} values in one file", problem_mark=mark)
        if not isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise _Refused(problem=f"nested more than {MAX_DEPTH} levels deep", problem_mark=mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# Drop the YAML 1.1 bool resolver (yes/no/on/off) and put back one that only knows true/false.
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class SourceMap:
    """Positions of values in one YAML file, addressed by their path (``("devices", 0, "id")``)."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.lines = text.splitlines()
        self.values: dict[Loc, tuple[int, int]] = {}
        self.keys: dict[Loc, tuple[int, int]] = {}
        self._containers: frozenset[Loc] | None = None

    def containers(self) -> frozenset[Loc]:
        """Paths that have a value below them (a set, not a scan per lookup: a file can bring thousands of errors)."""
        if self._containers is None:
            self._containers = frozenset(loc[:-1] for loc in self.values if loc)
        return self._containers

    def diagnostic(self, loc: Loc, message: str, *, key: bool = False) -> Diagnostic:
        """Position ``message`` at the deepest known part of ``loc`` (the key itself when ``key``)."""
        table = self.keys if key else self.values
        probe = tuple(loc)
        while probe:
            if probe in table:
                return self.at(*table[probe], message)
            if probe in self.values:
                return self.at(*self.values[probe], message)
            probe = probe[:-1]
        return Diagnostic(self.file, 1, 1, message, self.lines[0] if self.lines else None)

    def at(self, line: int, col: int, message: str) -> Diagnostic:
        source = self.lines[line - 1] if 0 < line <= len(self.lines) else None
        return Diagnostic(self.file, line, col, message, source)


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _build(node: yaml.Node, loc: Loc, smap: SourceMap, loader: _StrictLoader, errors: list[Diagnostic]) -> Any:
    smap.values[loc] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves YAML merge keys (<<)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int):
                errors.append(smap.at(*_mark(key_node), "mapping keys must be strings"))
                continue
            if key in out:
                first = smap.keys[(*loc, key)][0]
                message = f"duplicate key {key!r}: the first one (line {first}) is kept, this one is ignored"
                errors.append(smap.at(*_mark(key_node), message))
                continue
            smap.keys[(*loc, key)] = _mark(key_node)
            out[key] = _build(value_node, (*loc, key), smap, loader, errors)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(child, (*loc, i), smap, loader, errors) for i, child in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def load_yaml(
    path: Path, *, text: str | None = None, recovered: list[Diagnostic] | None = None
) -> tuple[Any, SourceMap]:
    """Load one YAML document strictly; return the plain data and its source map, or raise ConfigError.

    A duplicate or non-string key is an error the loader can step over (the first value is kept, the key skipped).
    With a ``recovered`` list such errors are appended to it and the data is returned, so the caller can validate it
    and report every problem of the file at once; without one they are raised like any other."""
    name = str(path)
    if text is None:
        text = _read_bounded(path)
    elif len(text) > MAX_FILE_BYTES or len(text.encode("utf-8")) > MAX_FILE_BYTES:
        raise ConfigError([_too_big(name, len(text.encode("utf-8")))])
    smap = SourceMap(name, text)
    try:
        loader = _StrictLoader(text)  # checks every character first (a control character is refused here)
    except yaml.reader.ReaderError as exc:
        raise ConfigError([_reader_error(exc, smap, text)]) from None
    errors: list[Diagnostic] = []
    try:
        node = loader.get_single_node()
        data = {} if node is None else _build(node, (), smap, loader, errors)
    except _Refused as exc:
        mark = exc.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ConfigError([smap.at(line, col, exc.problem or NO_ALIASES)]) from None
    except yaml.MarkedYAMLError as exc:
        plain = _syntax_error(exc, smap, text) or _layout_error(exc, smap)
        if plain is not None:
            raise ConfigError([plain]) from exc
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.context_mark and exc.problem_mark and exc.context_mark.line != exc.problem_mark.line:
            # the parser notices the mistake late (a missing '}' shows at the next line): point at where it began too
            where = f"line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1}"
            problem = f"{problem} ({exc.context} at {where})"
        raise ConfigError([smap.at(line, col, f"YAML syntax error: {problem}")]) from exc
    except yaml.reader.ReaderError as exc:
        raise ConfigError([_reader_error(exc, smap, text)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([smap.at(1, 1, f"YAML error: {exc}")]) from exc
    finally:
        loader.dispose()
    if errors and recovered is None:
        raise ConfigError(errors)
    if recovered is not None:
        recovered.extend(errors)
    return data, smap


_CLOSERS = {"[": "]", "{": "}"}
_OPENERS = {"]": "[", "}": "{"}
#: PyYAML's "but got 'X'" / "but found 'X'" (X a character such as ']' or a token name such as '<scalar>')
_FOUND = re.compile(r"but (?:got|found) '([^']*)'")


def _pos(mark: yaml.Mark) -> str:
    return f"{mark.line + 1}:{mark.column + 1}"


def _syntax_error(exc: yaml.MarkedYAMLError, smap: SourceMap, text: str) -> Diagnostic | None:
    """PyYAML's syntax errors about quotes, brackets and documents said in plain words, at the place to fix, each
    saying what to do; None for the ones ``_layout_error`` explains (indentation, tabs) or that are left as they are.

    PyYAML reports where it gave up (often the end of the file, or the line after the mistake); the mark of what
    it was reading then (``context_mark``: the quote or bracket that opened it) is where the writer has to look."""
    problem, context = exc.problem or "", exc.context or ""
    mark, start = exc.problem_mark, exc.context_mark
    if mark is None:
        return None
    found = _FOUND.search(problem)
    got = found.group(1) if found else ""
    if context == "while scanning a quoted scalar" and start is not None:
        quote = _char_at(smap, start) or '"'
        message = f"the quote {quote} opened at {_pos(start)} is never closed: close it at the end of the value, "
        message += "or remove it"
        if quote == "'":
            message += """ (text with a ' in it goes in double quotes: "don't")"""
        return smap.at(start.line + 1, start.column + 1, message)
    if got in ("]", "}"):
        unclosed = _open_flow_before(text, mark)
        if unclosed is None:
            message = f"this '{got}' closes nothing (no '{_OPENERS[got]}' is open here): remove it"
            return smap.at(mark.line + 1, mark.column + 1, message)
        opener = _char_at(smap, unclosed) or "["
        if _CLOSERS.get(opener) != got:
            message = f"this '{got}' does not close the '{opener}' opened at {_pos(unclosed)}: close that with "
            message += f"'{_CLOSERS.get(opener, ']')}' or remove the '{got}'"
            return smap.at(mark.line + 1, mark.column + 1, message)
    if context == "while scanning a simple key" and problem == "could not find expected ':'" and start is not None:
        message = "no ':' after this key on its line: end the key with ':', or remove the line"
        return smap.at(start.line + 1, start.column + 1, message)
    if context in ("while scanning an alias", "while scanning an anchor") and start is not None:
        sign = _char_at(smap, start) or "*"
        what = "an alias" if sign == "*" else "an anchor"
        message = f"a value starting with '{sign}' is read as {what}, which config files do not allow: quote the "
        message += f"value if the '{sign}' is text"
        return smap.at(start.line + 1, start.column + 1, message)
    if problem.startswith("expected the node content") and got in (",", ":", "?", "|", ">", "@", "`", "%"):
        message = f"a value cannot start with '{got}': quote the value if the '{got}' is part of it, or remove it"
        return smap.at(mark.line + 1, mark.column + 1, message)
    opener = _char_at(smap, start)
    flow = context.startswith("while parsing a flow ") and start is not None and opener in _CLOSERS
    if flow and start is not None and (problem.startswith("expected ','") or got == "<stream end>"):
        closer = _CLOSERS[opener]
        what = "list" if opener == "[" else "mapping"
        here, there = (_indent(smap, line) for line in (mark.line, start.line))
        if got == "<stream end>" or (mark.line > start.line and here <= there):
            # PyYAML stopped at a line that lines up with the one the bracket opened on (the next key or item):
            # the bracket was never closed, rather than an entry left without its comma
            above = _content_lines(smap, mark.line + 1 if got == "<stream end>" else mark.line)
            last = above[0] + 1 if above else start.line + 1
            message = f"the '{opener}' opened at {_pos(start)} is never closed: add '{closer}' after its last "
            message += f"item (line {last})"
            return smap.at(start.line + 1, start.column + 1, message)
        if got == ":":
            message = f"a ':' where ',' or '{closer}' was expected in the {what} opened at {_pos(start)}: separate "
            message += "entries with ', ', and quote a value that contains ': '"
        else:
            message = f"',' or '{closer}' expected here, in the {what} opened at {_pos(start)}: separate its "
            message += f"items with ', ' and end it with '{closer}'"
        return smap.at(mark.line + 1, mark.column + 1, message)
    if got == "<stream end>":
        unclosed = _open_flow_before(text, mark)
        if unclosed is not None:
            opener = _char_at(smap, unclosed) or "["
            above = _content_lines(smap, mark.line + 1)
            last = above[0] + 1 if above else unclosed.line + 1
            message = f"the '{opener}' opened at {_pos(unclosed)} is never closed: add '{_CLOSERS.get(opener, ']')}' "
            message += f"after its last item (line {last})"
            return smap.at(unclosed.line + 1, unclosed.column + 1, message)
    if problem == "but found another document":
        message = "a second YAML document starts here: a config file holds one, so remove this '---' line "
        message += "(and move what follows into its own file if it is meant as one)"
        return smap.at(mark.line + 1, mark.column + 1, message)
    if problem.startswith("expected '<document start>'"):
        ends = [i for i in _content_lines(smap, mark.line) if smap.lines[i].strip() == "..."]
        if ends:
            message = f"the document ended with '...' on line {ends[0] + 1}, so this line belongs to nothing: "
            message += "remove the '...'"
            return smap.at(mark.line + 1, mark.column + 1, message)
        return None
    quoted = _quote_before(text, mark)
    if quoted is not None:
        begin, end = quoted.start_mark, quoted.end_mark
        quote = "'" if quoted.style == "'" else '"'
        if begin.line < end.line:
            message = f"the quote {quote} opened at {_pos(begin)} is closed only at {end.line + 1}:{end.column}, so "
            message += f"the lines between are read as one value: close it on line {begin.line + 1}"
        elif quote == "'":
            message = f"the value quoted at {_pos(begin)} ends at the ' in column {end.column} and text follows it: "
            message += """write a ' inside single quotes twice ('it''s') or put the value in double quotes"""
        else:
            message = f'the value quoted at {_pos(begin)} ends at the " in column {end.column} and text follows it: '
            message += """write a " inside double quotes as \\" or put the value in single quotes"""
        return smap.at(begin.line + 1, begin.column + 1, message)
    return None


def _char_at(smap: SourceMap, mark: yaml.Mark | None) -> str:
    """The character at ``mark``, or "" past the end of its line or of the file."""
    if mark is None or not 0 <= mark.line < len(smap.lines):
        return ""
    line = smap.lines[mark.line]
    return line[mark.column] if 0 <= mark.column < len(line) else ""


def _indent(smap: SourceMap, line: int) -> int:
    text = smap.lines[line] if 0 <= line < len(smap.lines) else ""
    return len(text) - len(text.lstrip(" "))


def _open_flow_before(text: str, mark: yaml.Mark) -> yaml.Mark | None:
    """Where the innermost '[' or '{' still open at ``mark`` was opened, or None."""
    opened: list[yaml.Mark] = []
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if token.start_mark.index >= mark.index:
                break
            if isinstance(token, yaml.FlowSequenceStartToken | yaml.FlowMappingStartToken):
                opened.append(token.start_mark)
            elif isinstance(token, yaml.FlowSequenceEndToken | yaml.FlowMappingEndToken) and opened:
                opened.pop()
    except yaml.YAMLError:
        pass
    return opened[-1] if opened else None


def _quote_before(text: str, mark: yaml.Mark) -> yaml.ScalarToken | None:
    """The quoted value just before ``mark`` when it explains the error there: one that spans lines and ends on
    ``mark``'s line (a quote left open, closed by the next quote further down), or one that text follows
    directly (``'Tower's gateway'``: the apostrophe closed it)."""
    last: yaml.Token | None = None
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if token.start_mark.index >= mark.index:
                break
            last = token
    except yaml.YAMLError:
        pass
    if not isinstance(last, yaml.ScalarToken) or last.style not in ("'", '"'):
        return None
    spans_lines = last.start_mark.line < last.end_mark.line == mark.line
    return last if spans_lines or last.end_mark.index == mark.index else None


def _reader_error(exc: yaml.reader.ReaderError, smap: SourceMap, text: str) -> Diagnostic:
    """A character YAML does not allow (a control character, often pasted from a terminal or another program),
    at its line and column."""
    position = max(0, min(exc.position, len(text)))
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    code = exc.character if isinstance(exc.character, int) else 0
    message = f"character U+{code:04X} is not allowed in YAML (a control character): remove it"
    return smap.at(line, column, message)


def _key_column(line: str) -> int:
    """The 0-based column where a line's key starts (after list dashes: ``  - id: a`` has its key at 4)."""
    column = len(line) - len(line.lstrip(" "))
    while line.startswith("- ", column) or line.startswith("-\t", column):
        column += 2
        column += len(line[column:]) - len(line[column:].lstrip(" "))
    return column


def _content_lines(smap: SourceMap, before: int) -> list[int]:
    """0-based indexes of the lines above ``before`` holding YAML (not blank, not only a comment), nearest first."""
    before = min(before, len(smap.lines))
    return [i for i in range(before - 1, -1, -1) if smap.lines[i].strip() and not smap.lines[i].strip().startswith("#")]


def _layout_error(exc: yaml.MarkedYAMLError, smap: SourceMap) -> Diagnostic | None:
    """PyYAML's indentation and tab errors said in plain words, at the offending line; None for any other error.

    PyYAML names its tokens (``expected <block end>, but found '<block mapping start>'``); what the writer did wrong
    is visible from the line it points at and the line above it, so both are compared here."""
    mark = exc.problem_mark
    problem = exc.problem or ""
    if mark is None or not 0 <= mark.line < len(smap.lines):
        return None
    line = smap.lines[mark.line]
    if "character '\\t'" in problem:
        if line[: mark.column].strip(" ") == "":
            return smap.at(mark.line + 1, mark.column + 1, "a tab cannot indent YAML: use spaces")
        return smap.at(mark.line + 1, mark.column + 1, "a tab cannot separate YAML here: use spaces")
    wrong_value = problem == "mapping values are not allowed here"
    if not (wrong_value or problem.startswith("expected <block end>")):
        return None
    above_lines = _content_lines(smap, mark.line)
    if wrong_value and (not above_lines or line[: mark.column].count(": ") > 0):
        message = "a second ': ' on this line: put the value in quotes if it contains ': '"
        return smap.at(mark.line + 1, mark.column + 1, message)
    if not above_lines:
        return None
    above = above_lines[0]
    item = line.lstrip(" ").startswith("-")
    if item:  # a list item lines up by its dash
        here, there = len(line) - len(line.lstrip(" ")), len(smap.lines[above]) - len(smap.lines[above].lstrip(" "))
    else:
        here, there = _key_column(line), _key_column(smap.lines[above])
    what = "item" if item else "key"
    where = f"(at column {here + 1}; the {what} on line {above + 1} is at column {there + 1})"
    if here > there:
        message = f"this line is indented more than the {what} above it {where}: to go under that key, the key must "
        message += "end with ':' and have no value on its line; beside it, indent it the same"
        return smap.at(mark.line + 1, here + 1, message)
    if wrong_value:
        text = smap.lines[above].strip()
        if ":" not in text:
            message = "no ':' after this key, so the next line is read as part of it"
            return smap.at(above + 1, there + 1, message)
        return None
    if item and any(_key_column(smap.lines[i]) == here for i in above_lines if smap.lines[i].lstrip(" ")[:1] != "-"):
        message = "a list item ('- ') among keys: a list goes under a key that ends with ':', indented below it"
        return smap.at(mark.line + 1, here + 1, message)
    if here < there:
        message = f"this line is indented less than the {what} above it {where} and lines up with nothing further up: "
        message += "indent it like the keys it belongs with"
        return smap.at(mark.line + 1, here + 1, message)
    return None


def _too_big(name: str, size: int) -> Diagnostic:
    limit = _mib(MAX_FILE_BYTES)
    return Diagnostic(name, 0, 0, f"file is {_mib(size)} ({size} bytes); config files are limited to {limit}")


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB" if size % 1024**2 else f"{size // 1024**2} MiB"


def _read_bounded(path: Path) -> str:
    """The file's text, refusing a file over ``MAX_FILE_BYTES`` from its size, before reading it. At most one byte
    more is read, so a file that grows meanwhile (or a device such as /dev/zero) is refused too."""
    name = str(path)
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise ConfigError([_too_big(name, size)])
            raw = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError([Diagnostic(name, 0, 0, "file not found")]) from None
    except OSError as exc:
        # strerror ("Permission denied", "Is a directory") without the path the diagnostic already starts with
        raise ConfigError([Diagnostic(name, 0, 0, f"cannot read file: {exc.strerror or exc}")]) from exc
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError([_too_big(name, max(size, len(raw)))])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([_not_utf8(name, raw, exc)]) from None


def _not_utf8(name: str, raw: bytes, exc: UnicodeDecodeError) -> Diagnostic:
    """The first byte that is not UTF-8, at its line and column (counted in characters), with the line shown."""
    line_start = raw.rfind(b"\n", 0, exc.start) + 1
    line_end = raw.find(b"\n", exc.start)
    source = raw[line_start : line_end if line_end >= 0 else len(raw)].decode("utf-8", errors="replace")
    column = len(raw[line_start : exc.start].decode("utf-8", errors="replace")) + 1
    message = f"byte 0x{raw[exc.start]:02x} is not UTF-8: save the file as UTF-8 (a Latin-1 or Windows-1252 "
    message += "editor writes accented letters this way)"
    return Diagnostic(name, raw.count(b"\n", 0, exc.start) + 1, column, message, source.rstrip("\r"))


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'poll'?)`` when ``name`` is close to one of ``known``, else ``""``: one rule for unknown keys
    and unknown point names alike."""
    # the name itself is no suggestion (a union's other member may have it, where this one does not)
    close = difflib.get_close_matches(name, [k for k in known if k != name], n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _members(annotation: Any) -> list[Any]:
    """The types an annotation stands for: ``Annotated`` and ``Optional``/unions unwrapped."""
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return [t for arg in get_args(annotation) for t in _members(arg)]
    return [annotation]


def model_keys(model: type[BaseModel], loc: Iterable[str | int]) -> set[str]:
    """The keys (field names and aliases) a mapping at ``loc`` inside ``model`` may have; empty when unknown.

    Parts of ``loc`` that match no field (pydantic's union tags such as ``simulator``) are skipped."""
    keys: set[str] = set()
    for kind in _models_at(model, loc):
        for name, field in kind.model_fields.items():
            keys.add(field.alias or name)
    return keys


def renamed_key(model: type[BaseModel], loc: Iterable[str | int], key: str) -> str | None:
    """The new name of ``key`` when a model at ``loc`` declares it renamed (``StrictModel.renamed_keys``)."""
    for kind in _models_at(model, loc):
        new = kind.renamed_keys.get(key) if issubclass(kind, StrictModel) else None
        if new is not None:
            return new
    return None


def _models_at(model: type[BaseModel], loc: Iterable[str | int]) -> list[type[BaseModel]]:
    """The models a mapping at ``loc`` inside ``model`` may be validated by."""
    current: list[Any] = [model]
    for part in loc:
        found: list[Any] = []
        for kind in current:
            if isinstance(kind, type) and issubclass(kind, BaseModel) and isinstance(part, str):
                for name, field in kind.model_fields.items():
                    if part in (name, field.alias):
                        found.extend(_members(field.annotation))
            origin, args = get_origin(kind), get_args(kind)
            if isinstance(part, int) and origin in (list, tuple) and args:
                found.extend(_members(args[0]))
            if isinstance(part, str) and origin is dict and len(args) == 2:
                found.extend(_members(args[1]))
        if found:
            current = found
    return [kind for kind in current if isinstance(kind, type) and issubclass(kind, BaseModel)]


def pydantic_diagnostics(
    exc: ValidationError, smap: SourceMap, prefix: Loc = (), model: type[BaseModel] | None = None
) -> list[Diagnostic]:
    """Turn every pydantic error into a positioned diagnostic (unknown keys point at the key, with a "did you mean"
    when ``model`` is given and has a close field)."""
    out: list[Diagnostic] = []
    for err in exc.errors(include_url=False):
        # Tagged unions add the tag to the path (("devices", 0, "modbus", "poll")); drop non-data parts.
        kind = err["type"]
        full = (*prefix, *err["loc"])
        if kind in ("extra_forbidden", "missing") and full:
            loc = (*_data_loc(full[:-1], smap), full[-1])  # the last part is the key itself
        else:
            loc = _data_loc(full, smap)
        if kind == "extra_forbidden":
            msg = f"unknown key {loc[-1]!r}" if loc else "unknown key"
            new = renamed_key(model, err["loc"][:-1], str(loc[-1])) if loc and model is not None else None
            if new is not None:
                msg = f"{'.'.join(str(p) for p in loc)} was renamed {new}"
            elif loc and model is not None:
                msg += did_you_mean(str(loc[-1]), model_keys(model, err["loc"][:-1]))
            out.append(smap.diagnostic(loc, msg, key=True))
            continue
        if kind == "missing":
            msg = f"missing required key {loc[-1]!r}" if loc else "missing required key"
            out.append(smap.diagnostic(loc[:-1], msg))
            continue
        where = ".".join(str(p) for p in loc)
        message = err["input"].message if isinstance(err.get("input"), Rejected) else err["msg"]
        if kind in _SHAPES:
            message = f"should be {_SHAPES[kind]}, not {_yaml_kind(err.get('input'))}"
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        out.append(smap.diagnostic(loc, f"{where}: {message}" if where else message))
    return out


#: pydantic's "Input should be a valid dictionary" in the words of YAML's layout
_SHAPES = {
    "dict_type": "a mapping (key: value lines, or {key: value})",
    "model_type": "a mapping (key: value lines, or {key: value})",
    "list_type": "a list ('- ' items, or [a, b])",
}


def _yaml_kind(value: object) -> str:
    if value is None:
        return "empty"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    return f"the text {str(value)!r}"


def _data_loc(loc: Iterable[str | int], smap: SourceMap) -> Loc:
    """Keep only path parts that exist in the document (drops union tags like 'function-after[...]')."""
    kept: list[str | int] = []
    for part in loc:
        candidate = (*kept, part)
        if candidate in smap.values or candidate in smap.keys or not _known_prefix(candidate, smap):
            kept.append(part)
    return tuple(kept)


def _known_prefix(loc: Loc, smap: SourceMap) -> bool:
    """True when some value below ``loc[:-1]`` exists, i.e. ``loc[-1]`` would have to be a real key to be kept."""
    return loc[:-1] in smap.containers()


def validate(model: type[M], data: Any, smap: SourceMap, *, prefix: Loc = (), context: Any = None) -> M:
    """Validate ``data`` (found at ``prefix`` in the file) into ``model`` or raise ConfigError with positions."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(pydantic_diagnostics(exc, smap, prefix, model)) from None
