"""The cmd/write schema and the result schema for a relinquish: ``"relinquish": true`` instead of ``value``, never
both, never neither, never false; a relinquish result validates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

SCHEMAS = Path(__file__).resolve().parents[3] / "gateway" / "uplinks" / "schemas"
BASE = {"v": 1, "id": "dr-1", "point": "vav1.damper", "ts": 1795300000000}


def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMAS / name).read_text())
    return loaded


@pytest.mark.parametrize(
    ("extra", "valid"),
    [
        ({"value": 40}, True),
        ({"relinquish": True}, True),
        ({"value": 40, "relinquish": True}, False),
        ({}, False),
        ({"relinquish": False, "value": 40}, False),
        ({"relinquish": "yes"}, False),
    ],
)
def test_a_command_has_a_value_or_relinquish_true(extra: dict[str, Any], valid: bool) -> None:
    write = schema("command-write.schema.json")
    if valid:
        jsonschema.validate({**BASE, **extra}, write)
    else:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**BASE, **extra}, write)


def test_a_relinquish_result_validates() -> None:
    body = {
        "command_id": "dr-1",
        "action": "write",
        "point": "vav1.damper",
        "value": None,
        "relinquish": True,
        "status": "applied",
        "message": None,
    }
    jsonschema.validate(body, schema("command-result.schema.json"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**body, "relinquish": False}, schema("command-result.schema.json"))
