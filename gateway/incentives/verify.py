"""Verification of an incentive record stream, as the city platform or an auditor runs it.

Owns the checks and their wording: signatures (and which key signed), the hash chain, sequence gaps, duplicates and
replays, order, and the arithmetic inside each record. Imports only ``record`` (no ledger, no SQLite, no config):
``verify`` needs nothing but the records and the gateway's public key.

Input is JSON Lines: each line a record, or an outbox/MQTT event envelope whose ``body`` is the record.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from itertools import pairwise
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.incentives.record import GENESIS_HASH, SCHEMA_ID, key_id, record_hash, signature_valid

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema": str,
    "id": str,
    "seq": int,
    "prev_hash": str,
    "account": str,
    "interval": dict,
    "complete": bool,
    "status": str,
    "meters": list,
    "energy_kwh": str,
    "saving_kwh": str,
    "emission_factor_kg_per_kwh": str,
    "co2e_kg": str,
    "co2e_saved_kg": str,
    "key_id": str,
    "signature": str,
}
_MICRO = Decimal("0.000001")


@dataclass
class VerifyReport:
    records: int = 0
    problems: list[str] = field(default_factory=list)
    first_seq: int | None = None
    last_seq: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and self.records > 0


@dataclass
class _Seen:
    line: int
    hash: str
    signed_ok: bool


def _unwrap(item: Any) -> Any:
    """An outbox/MQTT event envelope carries the record in ``body``."""
    if isinstance(item, dict) and "signature" not in item and isinstance(item.get("body"), dict):
        return item["body"]
    return item


def _shape_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    for name, kind in _REQUIRED.items():
        if name not in record:
            return f"missing field {name!r}"
        value = record[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"field {name!r} has the wrong type"
    if record["schema"] != SCHEMA_ID:
        return f"unknown schema {record['schema']!r} (this verifier knows {SCHEMA_ID})"
    return None


def _decimal(text: Any) -> Decimal:
    if not isinstance(text, str):
        raise InvalidOperation
    return Decimal(text)


def _figure_problems(record: dict[str, Any]) -> list[str]:
    """Arithmetic a signature cannot vouch for: a gateway bug would sign wrong figures just as well."""
    try:
        energy = _decimal(record["energy_kwh"])
        saving = _decimal(record["saving_kwh"])
        factor = _decimal(record["emission_factor_kg_per_kwh"])
        meter_sum = sum((_decimal(m["kwh"]) for m in record["meters"]), Decimal(0))
        baseline = record.get("baseline")
        base_kwh = _decimal(baseline["kwh"]) if isinstance(baseline, dict) else None
        co2e = _decimal(record["co2e_kg"])
        co2e_saved = _decimal(record["co2e_saved_kg"])
    except (InvalidOperation, KeyError, TypeError):
        return ["a figure is not a decimal number"]
    problems: list[str] = []
    if meter_sum != energy:
        problems.append(f"energy_kwh {energy} is not the sum of its meters ({meter_sum})")
    if saving < 0:
        problems.append("negative saving")
    if saving > 0 and (not record["complete"] or record["status"] != "saving"):
        problems.append(f"a saving is issued for an interval with status {record['status']!r}")
    if record["status"] == "saving":
        expected = max(Decimal(0), base_kwh - energy) if base_kwh is not None else None
        if expected != saving:
            problems.append(f"saving_kwh {saving} is not baseline minus energy ({expected})")
    if (energy * factor).quantize(_MICRO, rounding=ROUND_HALF_EVEN) != co2e:
        problems.append(f"co2e_kg {co2e} is not energy_kwh x emission factor")
    if (saving * factor).quantize(_MICRO, rounding=ROUND_HALF_EVEN) != co2e_saved:
        problems.append(f"co2e_saved_kg {co2e_saved} is not saving_kwh x emission factor")
    return problems


def _gaps(seqs: list[int]) -> tuple[str, int]:
    """Missing ranges between sorted sequence numbers, as text, and how many are missing."""
    parts: list[str] = []
    missing = 0
    for before, after in pairwise(seqs):
        if after > before + 1:
            low, high = before + 1, after - 1
            parts.append(str(low) if low == high else f"{low}..{high}")
            missing += high - low + 1
    return ", ".join(parts), missing


def verify_lines(lines: Iterable[bytes | str], public_keys: Iterable[Ed25519PublicKey]) -> VerifyReport:
    """Check every record; return one problem string per problem found (none for a clean stream)."""
    keys = {key_id(k): k for k in public_keys}
    report = VerifyReport()
    by_id: dict[str, _Seen] = {}
    by_seq: dict[int, _Seen] = {}
    foreign_keys: dict[str, list[int]] = {}
    max_seq: int | None = None
    pending_chain: list[tuple[int, int, str, str]] = []  # (line, seq, id, prev_hash) checked once all are read

    for number, raw in enumerate(lines, start=1):
        text = raw.strip() if isinstance(raw, bytes) else raw.strip().encode()
        if not text:
            continue
        try:
            record = _unwrap(orjson.loads(text))
        except orjson.JSONDecodeError:
            report.problems.append(f"line {number}: not valid JSON")
            continue
        duplicate = _duplicate_key(text)
        if duplicate is not None:
            # parsers disagree on which of two equal keys wins: a line that says two things is tampered with
            report.problems.append(f"line {number}: duplicate JSON key {duplicate!r}")
            continue
        shape = _shape_problem(record)
        if shape is not None:
            report.problems.append(f"line {number}: {shape}")
            continue
        report.records += 1
        seq, rid = record["seq"], record["id"]
        where = f"line {number} (seq {seq}, {rid})"
        digest = record_hash(record)

        if rid in by_id:
            first = by_id[rid]
            if first.hash == digest:
                report.problems.append(f"{where}: replayed record, identical to line {first.line}")
            else:
                report.problems.append(f"{where}: a different record with the same id as line {first.line}")
            continue
        if seq in by_seq:
            report.problems.append(f"{where}: duplicate seq {seq}, already used on line {by_seq[seq].line}")
            continue

        key = keys.get(record["key_id"])
        if key is None:
            foreign_keys.setdefault(record["key_id"], []).append(number)
            signed_ok = False
        else:
            signed_ok = signature_valid(record, key)
            if not signed_ok:
                report.problems.append(f"{where}: bad signature: the record was changed after it was signed")
        if signed_ok:
            report.problems.extend(f"{where}: {p}" for p in _figure_problems(record))

        if max_seq is not None and seq < max_seq:
            report.problems.append(f"{where}: out of order, seq {seq} comes after seq {max_seq}")
        max_seq = seq if max_seq is None else max(max_seq, seq)
        seen = _Seen(number, digest, signed_ok)
        by_id[rid] = seen
        by_seq[seq] = seen
        pending_chain.append((number, seq, rid, record["prev_hash"]))

    for number, seq, rid, prev_hash in pending_chain:
        where = f"line {number} (seq {seq}, {rid})"
        if seq == 1:
            if prev_hash != GENESIS_HASH:
                report.problems.append(f"{where}: the first record must carry the genesis prev_hash")
            continue
        before = by_seq.get(seq - 1)
        # an unsigned or missing predecessor is reported on its own; do not report the same fault twice
        if before is not None and before.signed_ok and by_seq[seq].signed_ok and before.hash != prev_hash:
            report.problems.append(
                f"{where}: hash chain broken: prev_hash is not the hash of seq {seq - 1} (line {before.line})"
            )

    for foreign, numbers in foreign_keys.items():
        given = ", ".join(sorted(keys)) or "none"
        shown = ", ".join(str(n) for n in numbers[:5]) + (", ..." if len(numbers) > 5 else "")
        report.problems.append(
            f"{len(numbers)} record(s) signed by key {foreign}, not by the given key ({given}): lines {shown}"
        )

    if by_seq:
        report.first_seq, report.last_seq = min(by_seq), max(by_seq)
        gap_text, missing = _gaps(sorted(by_seq))
        if missing:
            report.problems.append(f"gap: seq {gap_text} missing ({missing} record(s))")
    if report.records == 0 and not report.problems:
        report.problems.append("no records found")
    return report


def _duplicate_key(text: bytes) -> str | None:
    """The first key that appears twice in one JSON object of ``text``, if any (orjson keeps the last silently)."""
    import json

    found: list[str] = []

    def check(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen and not found:
                found.append(key)
            seen.add(key)
        return dict(pairs)

    json.loads(text, object_pairs_hook=check)
    return found[0] if found else None
