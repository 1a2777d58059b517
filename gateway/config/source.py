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

from gateway.config.types import Rejected
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
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
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
    loader = _StrictLoader(text)
    errors: list[Diagnostic] = []
    try:
        node = loader.get_single_node()
        data = {} if node is None else _build(node, (), smap, loader, errors)
    except _Refused as exc:
        mark = exc.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ConfigError([smap.at(line, col, exc.problem or NO_ALIASES)]) from None
    except yaml.MarkedYAMLError as exc:
        plain = _layout_error(exc, smap)
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
    except yaml.YAMLError as exc:
        raise ConfigError([smap.at(1, 1, f"YAML error: {exc}")]) from exc
    finally:
        loader.dispose()
    if errors and recovered is None:
        raise ConfigError(errors)
    if recovered is not None:
        recovered.extend(errors)
    return data, smap


def _key_column(line: str) -> int:
    """The 0-based column where a line's key starts (after list dashes: ``  - id: a`` has its key at 4)."""
    column = len(line) - len(line.lstrip(" "))
    while line.startswith("- ", column) or line.startswith("-\t", column):
        column += 2
        column += len(line[column:]) - len(line[column:].lstrip(" "))
    return column


def _content_lines(smap: SourceMap, before: int) -> list[int]:
    """0-based indexes of the lines above ``before`` holding YAML (not blank, not only a comment), nearest first."""
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
        raise ConfigError([Diagnostic(name, 0, 0, f"cannot read file: {exc}")]) from exc


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
    keys: set[str] = set()
    for kind in current:
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            for name, field in kind.model_fields.items():
                keys.add(field.alias or name)
    return keys


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
            if loc and model is not None:
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
