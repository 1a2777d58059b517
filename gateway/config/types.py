"""Field types shared by every config model: strict base model, durations, identifiers, secrets."""

from __future__ import annotations

import math
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
    WrapValidator,
    model_validator,
)

from gateway.model import IDENT_RE, POINT_ID_RE

_SCALARS = (bool, int, float, str)


def _scalar_kinds(annotation: Any) -> frozenset[type] | None:
    """The scalar types a plain annotation admits (``int | None`` -> {int}); None when it admits anything else."""
    if annotation in _SCALARS:
        return frozenset({annotation})
    if annotation is type(None):
        return frozenset()
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *metadata = get_args(annotation)
        if any(isinstance(m, BeforeValidator | PlainValidator | WrapValidator) for m in metadata):
            return None  # parses its own text (e.g. ``PositiveDuration | None``)
        return _scalar_kinds(base)
    if origin is Union or origin is types.UnionType:
        kinds: set[type] = set()
        for arg in get_args(annotation):
            sub = _scalar_kinds(arg)
            if sub is None:
                return None
            kinds |= sub
        return frozenset(kinds)
    return None


def _admits(kinds: frozenset[type], value: Any) -> bool:
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    if isinstance(value, float):
        return float in kinds
    return str in kinds


class Rejected:
    """Stands in for a value refused before validation; its message becomes the diagnostic (see source.py)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return self.message


class StrictModel(BaseModel):
    """Unknown keys are errors; scalars are not coerced across types.

    pydantic's lax mode would turn ``enabled: "on"`` or ``"yes"`` into True and ``port: "1883"`` into an int; a
    config that says something else than it means must fail at load, with its position, instead.
    """

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True, populate_by_name=False)
    #: keys this model had under another name, old -> new: a site still using one gets "X was renamed Y" at the key
    #: instead of a bare "unknown key" (gateway.config.source.pydantic_diagnostics)
    renamed_keys: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _no_scalar_coercion(cls, data: Any) -> Any:
        # A model-level check (not a field validator): pydantic forbids before-validators on discriminator fields.
        if not isinstance(data, dict):
            return data
        checked = data
        for name, field in cls.model_fields.items():
            key = field.alias or name
            value = data.get(key)
            if value is None or not isinstance(value, _SCALARS):
                continue
            if any(isinstance(m, BeforeValidator | PlainValidator | WrapValidator) for m in field.metadata):
                continue  # the field parses its own text (durations, sizes, ids, secrets)
            kinds = _scalar_kinds(field.annotation)
            if not kinds or _admits(kinds, value):
                continue
            wanted = " or ".join(sorted({"bool": "true/false"}.get(k.__name__, k.__name__) for k in kinds))
            if checked is data:
                checked = dict(data)
            checked[key] = Rejected(f"expected {wanted}, got {type(value).__name__} {value!r}")
        return checked


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """``"15min"``, ``"500ms"``, ``"2h"``, ``"1.5s"`` or a number of seconds -> seconds (float).

    ``m`` means minutes (as in Prometheus and Telegraf); there is no month unit.
    """
    if isinstance(value, bool):
        raise ValueError("a duration is a number with a unit, like 5s, 500ms, 15min or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(f"invalid duration {value!r}: use a number with a unit (ms, s, min, h, d), like 15min")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]
    else:
        raise ValueError("a duration is a number with a unit, like 5s, 500ms, 15min or 1h")
    if not math.isfinite(seconds):
        raise ValueError(f"a duration must be finite, got {value!r}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


#: seconds, written in config as ``5s``/``500ms``/``15min``
Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(lambda s: f"{s}s")]
PositiveDuration = Annotated[Duration, Field(gt=0)]


_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3}


def parse_size(value: Any) -> int:
    """``"256MiB"``/``"1GB"``/bytes -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("kmgib")
        unit = text[len(number) :]
        if unit in _SIZE_UNITS and number.replace(".", "", 1).isdigit():
            return int(float(number) * _SIZE_UNITS[unit])
    raise ValueError(f"invalid size {value!r}: use bytes or a number with KiB, MiB, GiB (or kB, MB, GB)")


#: bytes, written in config as ``256MiB``, ``1GB`` or a number of bytes
Size = Annotated[int, BeforeValidator(parse_size), Field(gt=0)]


def _ident(value: Any) -> str:
    if not isinstance(value, str) or not IDENT_RE.match(value):
        raise ValueError(f"{value!r} is not a valid id: use lowercase letters, digits and _, starting with a letter")
    return value


def _point_id(value: Any) -> str:
    if not isinstance(value, str) or not POINT_ID_RE.match(value):
        raise ValueError(f"{value!r} is not a point id: use device.point (lowercase letters, digits, _)")
    return value


Ident = Annotated[str, BeforeValidator(_ident)]
PointId = Annotated[str, BeforeValidator(_point_id)]

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_secret(value: Any, info: ValidationInfo) -> Any:
    """``${NAME}`` is replaced by the environment variable; a missing variable is an error, never ''."""
    if not isinstance(value, str):
        return value
    env = (info.context or {}).get("env", os.environ) if isinstance(info.context, dict) else os.environ

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise ValueError(f"environment variable {name} is not set (referenced as ${{{name}}})")
        return str(env[name])

    return _ENV_RE.sub(sub, value)


class Secret(str):
    """A string that never prints its value (repr, str in f-strings of models, logs)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')"

    def reveal(self) -> str:
        return str.__str__(self)


class LiteralSecret(Secret):
    """A secret written out in the config file itself (no ``${ENV}``): accepted, and reported by ``check`` as a
    warning (an error with ``--strict``), since the file then holds a password anyone who reads it can use."""

    __slots__ = ()


def _secret(value: Any, info: ValidationInfo) -> Secret:
    expanded = _expand_secret(value, info)
    if not isinstance(expanded, str):
        raise ValueError("a secret must be a string (use ${ENV_NAME} or a *_file key)")
    if isinstance(value, str) and value and not _ENV_RE.search(value):
        return LiteralSecret(expanded)
    return Secret(expanded)


#: a string that may reference ``${ENV}``; its value is hidden in repr
SecretStr = Annotated[Secret, PlainValidator(_secret), PlainSerializer(lambda s: "***")]
#: a plain string with ``${ENV}`` expansion (hosts, usernames)
EnvStr = Annotated[str, BeforeValidator(_expand_secret)]


#: a token or password file holds one line; anything bigger is not one
MAX_SECRET_FILE_BYTES = 64 * 1024


def read_secret_file(path: Path) -> Secret:
    """Read a ``*_file:`` secret (first line, stripped), as systemd credentials and Docker secrets store them."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_SECRET_FILE_BYTES + 1)  # bounded: a secret file pointed at /dev/zero is refused
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_SECRET_FILE_BYTES:
        raise ValueError(f"secret file {path} is larger than {MAX_SECRET_FILE_BYTES // 1024} KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"cannot read secret file {path}: not UTF-8 text") from None
    lines = text.splitlines()
    return Secret(lines[0].strip() if lines else "")
