"""What one platform-contract message is: parsed, schema-checked and turned into what the receiver stores.

Owns the mapping from (topic, payload) to a ``Parsed`` message (or a ``Rejected`` one with its reason), the
deduplication key of every kind, and the line protocol written for telemetry. Pure: no I/O, no broker, no database.
Imports the contract's JSON Schemas (``gateway/uplinks/schemas``) and the incentive schemas beside the ledger code.

Keys (docs/platform-contract.md, "Sequence numbers, backfill and deduplication"):
    telemetry v1   ``t1/{device}/{seq}/{ts}``   ``(seq, ts)`` identifies a message on its device topic
    telemetry v2   ``t2/{device}/{seq}``        ``seq`` alone does
    events         ``e/{id}``                   event ids are stable across resends
    publications   ``p/{topic}/{id}``
A resend repeats the same bytes' meaning: the digest is taken over the canonical JSON (sorted keys), so a message
seen again with the same key and the same digest is a duplicate, and one with another digest is a replay that
says something else (quarantined). Telemetry's ``historical`` flag is left out of the digest: it says how the message
travelled, not what it says, and a message whose first send was never acknowledged (a broker node died with it in
flight) is resent from the backlog, flagged historical.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import orjson

from gateway.uplinks.lineprotocol import escape_key, escape_measurement, quote_string

_SCHEMAS = Path(__file__).resolve().parent.parent / "uplinks" / "schemas"
_INCENTIVE_SCHEMAS = Path(__file__).resolve().parent.parent / "incentives"
#: the measurement every platform telemetry value is written under (the field is the point name)
MEASUREMENT = "platform"

Kind = Literal["telemetry", "incentive", "checkpoint", "event", "publish", "status", "meta", "ignored"]


@dataclass(slots=True)
class Parsed:
    kind: Kind
    #: ``site/gateway``: the identity everything per gateway is keyed on
    gateway: str
    topic: str
    key: str = ""
    digest: bytes = b""
    #: telemetry: the outbox batch seq (gap tracking); incentive: the record's seq
    seq: int | None = None
    #: telemetry: line protocol, one line per read (ms precision)
    lines: list[str] = field(default_factory=list)
    samples: int = 0
    #: incentive record or checkpoint (the event's body)
    body: dict[str, Any] | None = None
    historical: bool = False
    #: telemetry: the newest read's time (Unix ms), for the end-to-end latency histogram
    ts_ms: int = 0


@dataclass(slots=True)
class Rejected:
    gateway: str
    topic: str
    #: short class of the problem (``schema``, ``json``, ``topic``, ...): logging is once per gateway and class
    problem: str
    reason: str


@cache
def _validator(name: str) -> Any:
    import jsonschema  # type: ignore[import-untyped]

    folder = _INCENTIVE_SCHEMAS if name.startswith("incentive-") else _SCHEMAS
    schema = orjson.loads((folder / name).read_bytes())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)  # the schemas use no "format": no format checker to pay for


def schema_problem(name: str, doc: Any) -> str | None:
    """The first violation of schema ``name`` (a file name) by ``doc``, as one line; None when it conforms."""
    validator = _validator(name)
    # the first error found ends the check: a valid message (nearly all) costs one pass and no sorting
    error = next(validator.iter_errors(doc), None)
    if error is None:
        return None
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    error = errors[0]
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{name}: at {where}: {error.message[:200]}"


def digest_of(doc: Any) -> bytes:
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).digest()[:16]


def parse(topic: str, payload: bytes, *, prefix: str) -> Parsed | Rejected:
    levels = topic.split("/")
    if len(levels) < 4 or levels[0] != prefix or not levels[1] or not levels[2]:
        return Rejected("?", topic, "topic", f"topic {topic!r} is not {prefix}/<site>/<gateway>/...")
    gateway = f"{levels[1]}/{levels[2]}"
    rest = levels[3:]
    if rest[0] == "cmd":
        return Parsed("ignored", gateway, topic)  # the platform's own requests to the gateway
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return Rejected(gateway, topic, "json", f"not JSON: {exc}")
    if not isinstance(doc, dict):
        return Rejected(gateway, topic, "json", "not a JSON object")
    head = rest[0]
    if head == "telemetry" and len(rest) == 2:
        return _telemetry(gateway, topic, rest[1], doc)
    if head == "events" and len(rest) == 2:
        return _event(gateway, topic, rest[1], doc)
    if head in ("status", "meta") and len(rest) == 1:
        problem = schema_problem(f"{head}.schema.json", doc)
        if problem is not None:
            return Rejected(gateway, topic, "schema", problem)
        return Parsed(head, gateway, topic)  # type: ignore[arg-type]
    if head in ("status", "meta", "telemetry", "events"):
        return Rejected(gateway, topic, "topic", f"topic {topic!r} has the wrong number of levels")
    problem = schema_problem("publish.schema.json", doc)
    if problem is not None:
        return Rejected(gateway, topic, "schema", problem)
    subject = "/".join(rest)
    return Parsed("publish", gateway, topic, key=f"p/{subject}/{doc['id']}", digest=digest_of(doc))


def _telemetry(gateway: str, topic: str, device: str, doc: dict[str, Any]) -> Parsed | Rejected:
    version = doc.get("v")
    if version not in (1, 2):
        return Rejected(gateway, topic, "schema", f"telemetry version {version!r} is neither 1 nor 2")
    problem = schema_problem("telemetry.schema.json" if version == 1 else "telemetry-v2.schema.json", doc)
    if problem is not None:
        return Rejected(gateway, topic, "schema", problem)
    site, gw = gateway.split("/", 1)
    tags = (
        f"{escape_measurement(MEASUREMENT)},device={escape_key(device)},gateway={escape_key(gw)},"
        f"site={escape_key(site)}"
    )
    reads = [doc] if version == 1 else doc["reads"]
    lines: list[str] = []
    samples = 0
    for read in reads:
        fields = []
        for name, value in sorted(read["values"].items()):
            encoded = _field(value)
            if encoded is not None:
                fields.append(f"{escape_key(name)}={encoded}")
        if fields:
            samples += len(fields)
            lines.append(f"{tags} {','.join(fields)} {read['ts']}")
    seq = doc["seq"]
    key = f"t1/{device}/{seq}/{doc['ts']}" if version == 1 else f"t2/{device}/{seq}"
    return Parsed(
        "telemetry",
        gateway,
        topic,
        key=key,
        digest=digest_of({k: v for k, v in doc.items() if k != "historical"}),
        seq=seq,
        lines=lines,
        samples=samples,
        historical=bool(doc.get("historical")),
        ts_ms=max(read["ts"] for read in reads),
    )


def _field(value: Any) -> str | None:
    # A field never changes type between writes: numbers are floats (InfluxDB refuses an int after a float)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        number = float(value)
        return repr(number) if math.isfinite(number) else None
    if isinstance(value, str):
        return quote_string(value)
    return None


def _event(gateway: str, topic: str, kind: str, doc: dict[str, Any]) -> Parsed | Rejected:
    problem = schema_problem("event.schema.json", doc)
    if problem is not None:
        return Rejected(gateway, topic, "schema", problem)
    if doc["type"] != kind:
        return Rejected(gateway, topic, "schema", f"event type {doc['type']!r} on the topic of {kind!r}")
    body = doc.get("body")
    if kind == "incentive":
        problem = schema_problem("incentive-record.schema.json", body)
        if problem is not None:
            return Rejected(gateway, topic, "schema", problem)
        assert isinstance(body, dict)
        if f"{body['site']}/{body['gateway']}" != gateway:
            return Rejected(
                gateway, topic, "identity", f"record of {body['site']}/{body['gateway']} on the topic of {gateway}"
            )
        return Parsed(
            "incentive", gateway, topic, key=f"e/{doc['id']}", digest=digest_of(body), seq=body["seq"], body=body
        )
    if kind == "incentive_checkpoint":
        problem = schema_problem("incentive-checkpoint.schema.json", body)
        if problem is not None:
            return Rejected(gateway, topic, "schema", problem)
        assert isinstance(body, dict)
        if f"{body['site']}/{body['gateway']}" != gateway:
            return Rejected(
                gateway, topic, "identity", f"checkpoint of {body['site']}/{body['gateway']} on the topic of {gateway}"
            )
        return Parsed("checkpoint", gateway, topic, digest=digest_of(body), seq=body["seq"], body=body)
    return Parsed("event", gateway, topic, key=f"e/{doc['id']}", digest=digest_of(doc))
