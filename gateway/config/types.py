"""Field types shared by every config model: strict base model, durations, identifiers, secrets."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationInfo

from gateway.model import IDENT_RE, POINT_ID_RE


class StrictModel(BaseModel):
    """Unknown keys are errors; values are not coerced across types (``"5"`` is not an int)."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True, populate_by_name=False)


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
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


#: seconds, written in config as ``5s``/``500ms``/``15min``
Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(lambda s: f"{s}s")]
PositiveDuration = Annotated[Duration, Field(gt=0)]


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


def _secret(value: Any, info: ValidationInfo) -> Secret:
    expanded = _expand_secret(value, info)
    if not isinstance(expanded, str):
        raise ValueError("a secret must be a string (use ${ENV_NAME} or a *_file key)")
    return Secret(expanded)


#: a string that may reference ``${ENV}``; its value is hidden in repr
SecretStr = Annotated[Secret, PlainValidator(_secret), PlainSerializer(lambda s: "***")]
#: a plain string with ``${ENV}`` expansion (hosts, usernames)
EnvStr = Annotated[str, BeforeValidator(_expand_secret)]


def read_secret_file(path: Path) -> Secret:
    """Read a ``*_file:`` secret (first line, stripped), as systemd credentials and Docker secrets store them."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror or exc}") from exc
    lines = text.splitlines()
    return Secret(lines[0].strip() if lines else "")
