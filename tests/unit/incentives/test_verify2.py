"""``incentives verify`` (record schema 2) and ``incentives export``, on a stream built by hand.

The stream below is written from docs/incentives.md with every figure worked out by hand (the comments show the
arithmetic); the only code shared with the verifier is ``record.py`` (encoding, hashing, signing). A tiny helper
fills what is pure bookkeeping: ids, seq, chain, signatures, CO2e (figure x factor, half-even) and settlement sums.
Each fault test forges one thing, re-signs and re-chains like a faulty or dishonest gateway would, and asserts the
exact problem line.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jsonschema  # type: ignore[import-untyped]
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.cli import main
from gateway.incentives.record import (
    CHECKPOINT_SCHEMA_ID,
    SCHEMA_ID,
    checkpoint_problems,
    key_id,
    make_checkpoint,
    record_hash,
    sign,
)
from gateway.incentives.verify import verify_lines

GATEWAY, SITE = "gw1", "tower"
ACCT_A = "acct_" + "a" * 32  # like-days baseline
ACCT_B = "acct_" + "b" * 32  # fixed baseline 0.3 kWh
METER_A = "meter_" + "a" * 16
METER_B = "meter_" + "b" * 16
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # throw-away, fixed so failures reproduce
PUBLIC = KEY.public_key()
ZERO = "0.000000"
PACKAGE = Path(__file__).resolve().parents[3] / "gateway" / "incentives"


def programme(netting: str = "day", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "interval_s": 900,
        "max_gap_s": 300,
        "settle_s": 60,
        "max_delay_s": 3600,
        "max_clock_skew_s": 300,
        "netting": netting,
        "timezone": "Asia/Shanghai",  # UTC+8, no DST: 00:00Z is 08:00 local
        "resolution_share": "0.1",
        "exclude_dates": ["2026-10-01"],
        "emission_factor": {
            "kg_per_kwh": "0.5703",
            "by_time_of_day": [{"from": "23:00", "to": "07:00", "kg_per_kwh": "0.52"}],
        },
        "pseudonym_key": "0123456789abcdef",
        "accounts": [
            {
                "account": ACCT_A,
                "baseline": {"method": "like_days", "days": 2, "min_days": 1, "lookback_days": 14},
                "meters": [
                    {
                        "meter": METER_A,
                        "limit_w": 40000,
                        "wrap_kwh": "42949672.960000",
                        "resolution_kwh": "0.001000",
                        "replacements": [],
                    }
                ],
            },
            {
                "account": ACCT_B,
                "baseline": {"method": "fixed", "kwh": "0.300000"},
                "meters": [
                    {
                        "meter": METER_B,
                        "limit_w": 40000,
                        "wrap_kwh": None,
                        "resolution_kwh": "0.001000",
                        "replacements": [],
                    }
                ],
            },
        ],
    }
    body.update(changes)
    return body


# -- the bookkeeping helper (independent of the verifier) -----------------------------------------------------


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _ns(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp()) * 1_000_000_000


def _times(figure: str, factor: str) -> str:
    return str((Decimal(figure) * Decimal(factor)).quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN))


def _plus_900(start: str) -> str:
    return datetime.fromtimestamp(_ns(start) // 10**9 + 900, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(body: dict[str, Any], *, number: int = 1, previous: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"kind": "epoch", "epoch": number, "programme_body": body, "previous_programme": previous,
            "reason": "genesis" if number == 1 else "new programme", **extra}  # fmt: skip


def interval(
    label: str,
    account: str,
    start: str,
    readings: list[tuple[str, str]],
    *,
    kwh: str,
    baseline: dict[str, Any] | None,
    status: str,
    delta: str = ZERO,
    saving: str = ZERO,
    allocated: str = ZERO,
    flags: tuple[str, ...] = (),
    notes: tuple[str, ...] = (),
    outliers: tuple[tuple[str, str], ...] = (),
    factor: str = "0.5703",
    end: str | None = None,
    energy: str | None = None,
) -> dict[str, Any]:
    meter = METER_A if account == ACCT_A else METER_B
    local = datetime.fromtimestamp(_ns(start) // 10**9, ZoneInfo("Asia/Shanghai")).isoformat()
    return {
        "_label": label,
        "kind": "interval",
        "account": account,
        "interval": {"start": start, "end": end or _plus_900(start), "local_start": local},
        "status": status,
        "flags": list(flags),
        "notes": list(notes),
        "meters": [
            {
                "meter": meter,
                "readings": [{"ts": ts, "kwh": k} for ts, k in readings],
                "allocated_kwh": allocated,
                "outliers": [{"ts": ts, "kwh": k} for ts, k in outliers],
                "kwh": kwh,
                "flags": list(flags),
                "notes": list(notes),
            }
        ],
        "energy_kwh": energy or kwh,
        "baseline": baseline,
        "delta_kwh": delta,
        "saving_kwh": saving,
        "emission_factor_kg_per_kwh": factor,
    }


def settlement(account: str, day: str, labels: list[str], **overrides: Any) -> dict[str, Any]:
    return {"kind": "settlement", "account": account, "day": day, "_labels": labels, "_overrides": overrides}


def like_days(kwh: str, *days: tuple[str, str]) -> dict[str, Any]:
    return {"method": "like_days", "kwh": kwh, "days": [{"start": s, "kwh": k} for s, k in days]}


FIXED = {"method": "fixed", "kwh": "0.300000"}


def build(bodies: list[dict[str, Any]], *, first_seq: int = 1) -> list[dict[str, Any]]:
    """Ids, seq, epoch/programme in force, CO2e, settlement entries and sums, chain and signatures."""
    records: list[dict[str, Any]] = []
    by_label: dict[str, dict[str, Any]] = {}
    prev_hash = "0" * 64
    number, programme_hash, factor_night = 0, "", "0.52"
    for seq, source in enumerate(bodies, start=first_seq):
        body = {k: v for k, v in source.items() if not k.startswith("_")}
        if body["kind"] == "epoch":
            number = body["epoch"]
            programme_hash = (
                source.get("_hash")
                or hashlib.sha256(orjson.dumps(body["programme_body"], option=orjson.OPT_SORT_KEYS)).hexdigest()
            )
            body["programme"] = programme_hash
            body.setdefault("id", "epo_" + _sha(f"{GATEWAY}/epoch/{number}")[:32])
        elif body["kind"] == "interval":
            body.setdefault("id", "inc_" + _sha(f"{GATEWAY}/{body['account']}/{_ns(body['interval']['start'])}")[:32])
            factor = body["emission_factor_kg_per_kwh"]
            assert factor in ("0.5703", factor_night)
            body.setdefault("co2e_kg", _times(body["energy_kwh"], factor))
            body.setdefault("co2e_delta_kg", _times(body["delta_kwh"], factor))
            body.setdefault("co2e_saved_kg", _times(body["saving_kwh"], factor))
        else:
            entries = [
                {"id": by_label[label]["id"], "seq": by_label[label]["seq"],
                 "delta_kwh": by_label[label]["delta_kwh"], "co2e_delta_kg": by_label[label]["co2e_delta_kg"]}
                for label in source["_labels"]
            ]  # fmt: skip
            net = sum(Decimal(e["delta_kwh"]) for e in entries)
            co2e = sum(Decimal(e["co2e_delta_kg"]) for e in entries)
            saving = max(Decimal(0), net)
            body.update(
                intervals=entries,
                net_kwh=f"{net:.6f}",
                saving_kwh=f"{saving:.6f}",
                co2e_saved_kg=f"{max(Decimal(0), co2e) if saving > 0 else Decimal(0):.6f}",
            )
            body.update(source["_overrides"])
            body.setdefault("id", "set_" + _sha(f"{GATEWAY}/{body['account']}/day/{body['day']}")[:32])
        if body["kind"] != "epoch":
            body["programme"] = programme_hash
        body.update(schema=SCHEMA_ID, seq=seq, prev_hash=prev_hash, gateway=GATEWAY, site=SITE, epoch=number)
        body["key_id"] = key_id(PUBLIC)
        body["signature"] = sign(body, KEY)
        prev_hash = record_hash(body)
        records.append(body)
        if "_label" in source:
            by_label[source["_label"]] = body
    return records


def stream_bodies(netting: str = "day") -> list[dict[str, Any]]:
    """Three days (Mon 2026-11-30 .. Wed 2026-12-02), two accounts, the 08:00 local slot (00:00Z) and 23:00."""
    bodies: list[dict[str, Any]] = [
        epoch(programme(netting)),
        # seq 2, Mon: steady 0.1 kWh per 5 min = 0.3 kWh; no history yet: no_baseline; CO2e 0.3 x 0.5703 = 0.171090
        interval("A1", ACCT_A, "2026-11-30T00:00:00Z",
                 [("2026-11-30T00:00:00Z", "100.000000"), ("2026-11-30T00:05:00Z", "100.100000"),
                  ("2026-11-30T00:10:00Z", "100.200000"), ("2026-11-30T00:15:00Z", "100.300000")],
                 kwh="0.300000", baseline=None, status="no_baseline"),
        # seq 3: 0.15 kWh against the fixed 0.3: delta 0.15 (paid by the day's settlement)
        interval("B1", ACCT_B, "2026-11-30T00:00:00Z",
                 [("2026-11-30T00:00:00Z", "50.000000"), ("2026-11-30T00:05:00Z", "50.050000"),
                  ("2026-11-30T00:10:00Z", "50.100000"), ("2026-11-30T00:15:00Z", "50.150000")],
                 kwh="0.150000", baseline=FIXED, status="measured", delta="0.150000",
                 saving="0.150000" if netting == "interval" else ZERO),
    ]  # fmt: skip
    if netting == "day":
        bodies += [settlement(ACCT_A, "2026-11-30", ["A1"]), settlement(ACCT_B, "2026-11-30", ["B1"])]
    bodies += [
        # Tue. Readings every 4 min from 23:58Z, each pair +0.04: allocated = cum(c0, c1, 00:00) = 40000 * 2/4 =
        # 20000 µkWh; energy = 4 whole pairs (160000) + cum(00:14, 00:18, 00:15) = 40000 * 1/4 = 10000, minus the
        # allocation: 150000 µkWh. Baseline: Monday's 0.3 (the only like day): delta 0.15.
        interval("A2", ACCT_A, "2026-12-01T00:00:00Z",
                 [("2026-11-30T23:58:00Z", "200.000000"), ("2026-12-01T00:02:00Z", "200.040000"),
                  ("2026-12-01T00:06:00Z", "200.080000"), ("2026-12-01T00:10:00Z", "200.120000"),
                  ("2026-12-01T00:14:00Z", "200.160000"), ("2026-12-01T00:18:00Z", "200.200000")],
                 allocated="0.020000", kwh="0.150000",
                 baseline=like_days("0.300000", ("2026-11-30T00:00:00Z", "0.300000")),
                 status="measured", delta="0.150000", saving="0.150000" if netting == "interval" else ZERO),
        # 4.95 kWh in 5 min is above 40 kW x 5 min + 0.001 = 3.334333 kWh: counted, flag spike, delta 0
        interval("B2", ACCT_B, "2026-12-01T00:00:00Z",
                 [("2026-12-01T00:00:00Z", "60.000000"), ("2026-12-01T00:05:00Z", "60.050000"),
                  ("2026-12-01T00:10:00Z", "65.000000"), ("2026-12-01T00:15:00Z", "65.050000")],
                 kwh="5.050000", baseline=FIXED, status="flagged", flags=("spike",)),
    ]  # fmt: skip
    if netting == "interval":
        return bodies
    bodies += [
        settlement(ACCT_A, "2026-12-01", ["A2"]),
        settlement(ACCT_B, "2026-12-01", ["B2"]),
        # Wed. The 32-bit counter wraps: 42949672.96 - 42949672.90 + 0.04 = 0.1 (note rollover), then 0.1, 0.1.
        # Baseline: Tue 0.15 and Mon 0.3, newest first, mean 0.225; delta 0.225 - 0.3 = -0.075;
        # CO2e delta -0.075 x 0.5703 = -0.0427725 -> -0.042772 (half-even)
        interval("A3", ACCT_A, "2026-12-02T00:00:00Z",
                 [("2026-12-02T00:00:00Z", "42949672.900000"), ("2026-12-02T00:05:00Z", "0.040000"),
                  ("2026-12-02T00:10:00Z", "0.140000"), ("2026-12-02T00:15:00Z", "0.240000")],
                 kwh="0.300000", notes=("rollover",),
                 baseline=like_days("0.225000", ("2026-12-01T00:00:00Z", "0.150000"),
                                    ("2026-11-30T00:00:00Z", "0.300000")),
                 status="measured", delta="-0.075000"),
        # A bad 0 at 00:10 between 70.08 and 70.12: reset then spike around it, plausible without it: an outlier.
        # Energy 3 x 0.04 + 0.03 = 0.15, flag spike, delta 0.
        interval("B3", ACCT_B, "2026-12-02T00:00:00Z",
                 [("2026-12-02T00:00:00Z", "70.000000"), ("2026-12-02T00:04:00Z", "70.040000"),
                  ("2026-12-02T00:08:00Z", "70.080000"), ("2026-12-02T00:12:00Z", "70.120000"),
                  ("2026-12-02T00:15:00Z", "70.150000")],
                 outliers=(("2026-12-02T00:10:00Z", "0.000000"),),
                 kwh="0.150000", baseline=FIXED, status="flagged", flags=("spike",)),
        # 23:00 local: the night factor 0.52. 0.25 kWh, delta 0.05, CO2e 0.13, CO2e delta 0.026
        interval("B3n", ACCT_B, "2026-12-02T15:00:00Z",
                 [("2026-12-02T15:00:00Z", "80.000000"), ("2026-12-02T15:05:00Z", "80.100000"),
                  ("2026-12-02T15:10:00Z", "80.200000"), ("2026-12-02T15:15:00Z", "80.250000")],
                 kwh="0.250000", baseline=FIXED, status="measured", delta="0.050000", factor="0.52"),
        settlement(ACCT_A, "2026-12-02", ["A3"]),
        settlement(ACCT_B, "2026-12-02", ["B3", "B3n"]),
    ]  # fmt: skip
    return bodies


def lines(records: list[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in records]


def checkpoint_for(records: list[dict[str, Any]]) -> dict[str, Any]:
    last = records[-1]
    ts_ns = 1_796_200_000 * 10**9 + 999_999_999
    return make_checkpoint(gateway=GATEWAY, site=SITE, epoch=last["epoch"], seq=last["seq"],
                           head_hash=record_hash(last), ts_ns=ts_ns, private_key=KEY)  # fmt: skip


def problems_of(records: list[dict[str, Any]], **kwargs: Any) -> list[str]:
    return verify_lines(lines(records), [PUBLIC], **kwargs).problems


def labelled(bodies: list[dict[str, Any]], label: str) -> dict[str, Any]:
    return next(b for b in bodies if b.get("_label") == label)


def where(records: list[dict[str, Any]], seq: int) -> str:
    record = next(r for r in records if r["seq"] == seq)
    return f"line {records.index(record) + 1} (seq {seq}, {record['id']})"


# -- the clean stream ------------------------------------------------------------------------------------------


def test_the_hand_built_stream_verifies_with_its_checkpoint() -> None:
    records = build(stream_bodies())
    assert [r["kind"] for r in records].count("settlement") == 6 and len(records) == 14
    report = verify_lines(lines(records), [PUBLIC], checkpoint=checkpoint_for(records))
    assert report.problems == []
    assert report.summary() == (
        "ok: 14 record(s) (1 epoch, 7 interval, 6 settlement), seq 1..14, signatures, chain and figures valid; "
        "checkpoint at seq 14 matches"
    )


def test_interval_netting_pays_per_interval_and_verifies() -> None:
    records = build(stream_bodies("interval"))
    assert problems_of(records) == []
    assert [r["saving_kwh"] for r in records[1:]] == [ZERO, "0.150000", "0.150000", ZERO]


def test_every_kind_and_the_checkpoint_match_the_json_schemas() -> None:
    record_schema = json.loads((PACKAGE / "incentive-record.schema.json").read_text())
    checkpoint_schema = json.loads((PACKAGE / "incentive-checkpoint.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(record_schema)
    jsonschema.Draft202012Validator.check_schema(checkpoint_schema)
    records = build(stream_bodies())
    assert {r["kind"] for r in records} == {"epoch", "interval", "settlement"}
    for record in records:
        jsonschema.validate(record, record_schema, cls=jsonschema.Draft202012Validator)
    jsonschema.validate(checkpoint_for(records), checkpoint_schema, cls=jsonschema.Draft202012Validator)
    forged = {**records[1], "saving_kwh": "1.5"}  # not six places
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(forged, record_schema, cls=jsonschema.Draft202012Validator)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**records[1], "extra": 1}, record_schema, cls=jsonschema.Draft202012Validator)


# -- forged or faulty records: one test each, the exact line ---------------------------------------------------


def test_a_saving_on_a_flagged_interval() -> None:
    bodies = stream_bodies("interval")
    labelled(bodies, "B2")["saving_kwh"] = "0.150000"
    records = build(bodies)
    assert problems_of(records) == [
        f"{where(records, 5)}: saving_kwh 0.150000 is not max(0, delta) (0.000000)",
        f"{where(records, 5)}: a saving of 0.150000 kWh on a flagged interval (flags: spike; status flagged)",
    ]


def test_a_meter_kwh_that_its_readings_do_not_give() -> None:
    bodies = stream_bodies()
    labelled(bodies, "B1").update(energy_kwh="0.200000", delta_kwh="0.100000")
    labelled(bodies, "B1")["meters"][0]["kwh"] = "0.200000"
    records = build(bodies)  # the settlement follows the forged figures: only the readings tell
    assert problems_of(records) == [
        f"{where(records, 3)}: meter {METER_B}: kwh 0.200000 is not what its readings give (0.150000)"
    ]


def test_negative_energy_with_a_saving() -> None:
    bodies = stream_bodies("interval")
    labelled(bodies, "B1").update(energy_kwh="-0.050000", delta_kwh="0.350000", saving_kwh="0.350000")
    labelled(bodies, "B1")["meters"][0]["kwh"] = "-0.050000"
    records = build(bodies)
    at = where(records, 3)
    assert problems_of(records) == [
        f"{at}: meter {METER_B}: negative energy, kwh -0.050000",
        f"{at}: meter {METER_B}: kwh -0.050000 is not what its readings give (0.150000)",
        f"{at}: negative energy_kwh -0.050000",
    ]


def test_a_one_day_interval_is_off_the_grid() -> None:
    bodies = stream_bodies()
    # one pair over a whole day: spans more than max_gap_s, so honestly flagged gap (incomplete)
    bodies.append(interval("B4", ACCT_B, "2026-12-03T00:00:00Z",
                           [("2026-12-03T00:00:00Z", "90.000000"), ("2026-12-04T00:00:00Z", "91.000000")],
                           end="2026-12-04T00:00:00Z", kwh="1.000000", baseline=FIXED, status="incomplete",
                           flags=("gap",)))  # fmt: skip
    records = build(bodies)
    assert problems_of(records) == [
        f"{where(records, 15)}: the interval is 86400 s long, not interval_s 900 of epoch 1"
    ]


def _b4(start: str, first: str, readings: list[tuple[str, str]], **kwargs: Any) -> dict[str, Any]:
    return interval(first, ACCT_B, start, readings, baseline=FIXED, **kwargs)


THURSDAY = [("2026-12-03T00:00:00Z", "90.000000"), ("2026-12-03T00:05:00Z", "90.050000"),
            ("2026-12-03T00:10:00Z", "90.100000"), ("2026-12-03T00:15:00Z", "90.150000")]  # fmt: skip


def test_a_second_record_for_the_same_account_and_interval_is_a_double_issue() -> None:
    bodies = stream_bodies()
    again = {**labelled(bodies, "B3n"), "id": "inc_" + "0" * 32, "_label": "again"}
    records = build([*bodies, again])
    assert problems_of(records) == [
        f"{where(records, 15)}: id is not derived from gateway, account and interval start ({records[11]['id']})",
        f"{where(records, 15)}: double issue: this account's interval starting 2026-12-02T15:00:00Z was issued "
        f"already (line 12, seq 12, {records[11]['id']})",
    ]


def test_overlapping_intervals_of_one_account() -> None:
    bodies = stream_bodies()
    bodies.append(_b4("2026-12-03T00:00:00Z", "B4", THURSDAY, kwh="0.150000", status="measured", delta="0.150000"))
    shifted = [("2026-12-03T00:05:00Z", "90.050000"), ("2026-12-03T00:10:00Z", "90.100000"),
               ("2026-12-03T00:15:00Z", "90.150000"), ("2026-12-03T00:20:00Z", "90.200000"),
               ("2026-12-03T00:25:00Z", "90.250000")]  # fmt: skip
    # 00:07:30..00:22:30: allocated = cum(00:05, 00:10, 00:07:30) = 0.025; 0.025 + 0.05 + 0.05 + 0.025 = 0.15
    bodies.append(_b4("2026-12-03T00:07:30Z", "B4x", shifted, allocated="0.025000", kwh="0.150000",
                      status="measured", delta="0.150000"))  # fmt: skip
    records = build(bodies)
    assert problems_of(records) == [
        f"{where(records, 16)}: the interval start 2026-12-03T00:07:30Z is not on the grid of interval_s 900",
        f"{where(records, 16)}: the interval 2026-12-03T00:07:30Z..2026-12-03T00:22:30Z overlaps "
        f"2026-12-03T00:00:00Z..2026-12-03T00:15:00Z of the same account (line 15, seq 15, {records[14]['id']})",
    ]


def test_a_stream_without_its_first_records() -> None:
    records = build(stream_bodies())
    assert problems_of(records[2:]) == [
        f"the first records are missing: the stream starts at seq 3 (line 1 (seq 3, {records[2]['id']})), not with "
        "the genesis record at seq 1 (a partial export is verified with --from-seq)"
    ]
    assert problems_of(records[1:])[0].startswith("the first records are missing: the stream starts at seq 2")


def test_a_truncated_tail_is_shown_by_the_checkpoint() -> None:
    records = build(stream_bodies())
    checkpoint = checkpoint_for(records)
    assert problems_of(records[:-2], checkpoint=checkpoint) == ["tail missing: seq 13..14"]
    assert problems_of(records[:-2]) == []  # without the checkpoint a clean cut cannot be told


def test_a_checkpoint_that_names_another_record() -> None:
    records = build(stream_bodies())
    checkpoint = checkpoint_for(records)
    forged = build([*stream_bodies()[:-1], settlement(ACCT_B, "2026-12-02", ["B3"], net_kwh="0.000000")])
    problems = problems_of(forged, checkpoint=checkpoint)
    assert problems[-1] == (
        f"checkpoint: seq 14 in the stream (line 14) has hash {record_hash(forged[-1])}, the checkpoint says "
        f"{record_hash(records[-1])}"
    )
    bad = {**checkpoint, "seq": 13}
    assert problems_of(records, checkpoint=bad) == [
        "checkpoint: bad checkpoint signature: the checkpoint was changed after it was signed"
    ]
    other_epoch = {**checkpoint, "epoch": 2}
    other_epoch["signature"] = sign(other_epoch, KEY)
    assert problems_of(records, checkpoint=other_epoch) == ["checkpoint: epoch 2 is not that of seq 14 (1)"]


def test_a_programme_hash_that_is_not_the_hash_of_the_epoch_body() -> None:
    bodies = stream_bodies()
    honest = hashlib.sha256(orjson.dumps(programme(), option=orjson.OPT_SORT_KEYS)).hexdigest()
    bodies[0] = {**epoch(programme(settle_s=61)), "_hash": honest}  # the body changed, the hash did not
    records = build(bodies)
    actual = hashlib.sha256(orjson.dumps(programme(settle_s=61), option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert problems_of(records) == [
        f"{where(records, 1)}: programme {honest} is not the hash of its programme_body ({actual})"
    ]


def test_a_baseline_that_is_not_the_mean_of_its_days() -> None:
    bodies = stream_bodies()
    a3 = labelled(bodies, "A3")
    a3["baseline"]["kwh"], a3["delta_kwh"] = "0.250000", "-0.050000"
    records = build(bodies)
    assert problems_of(records) == [
        f"{where(records, 10)}: baseline kwh 0.250000 is not the mean of its days (0.225000)"
    ]


def test_a_listed_baseline_day_that_is_flagged_in_the_stream() -> None:
    bodies = stream_bodies()
    a2 = labelled(bodies, "A2")  # the gateway saw its clock step back: a declared flag, so no delta that day
    a2.update(flags=["clock"], status="flagged", delta_kwh=ZERO)
    a2["meters"][0]["flags"] = ["clock"]
    records = build(bodies)  # ... and Wednesday's baseline still uses Tuesday
    assert problems_of(records) == [
        f"{where(records, 10)}: baseline day 2026-12-01T00:00:00Z is a flagged interval (line 6, seq 6, "
        f"{records[5]['id']})"
    ]


def test_a_baseline_that_skips_a_usable_like_day() -> None:
    bodies = stream_bodies()
    a3 = labelled(bodies, "A3")  # lists only Monday although Tuesday is newer and usable
    a3["baseline"] = like_days("0.300000", ("2026-11-30T00:00:00Z", "0.300000"))
    a3["delta_kwh"] = ZERO
    records = build(bodies)
    assert problems_of(records) == [
        f"{where(records, 10)}: baseline days are not the newest usable like days in the stream: expected "
        "[2026-12-01T00:00:00Z, 2026-11-30T00:00:00Z], listed [2026-11-30T00:00:00Z]"
    ]


def test_no_baseline_although_the_stream_has_usable_like_days() -> None:
    bodies = stream_bodies()
    a3 = labelled(bodies, "A3")
    a3.update(baseline=None, status="no_baseline", delta_kwh=ZERO)
    records = build(bodies)
    assert problems_of(records) == [
        f"{where(records, 10)}: baseline is null although the stream has 2 usable like day(s) (min_days 1)"
    ]


def test_a_settlement_whose_sum_is_wrong() -> None:
    bodies = stream_bodies()
    bodies[-1] = settlement(ACCT_B, "2026-12-02", ["B3", "B3n"], net_kwh="0.060000", saving_kwh="0.060000")
    records = build(bodies)
    assert problems_of(records) == [
        f"{where(records, 14)}: net_kwh 0.060000 is not the sum of the listed deltas (0.050000)"
    ]


def test_an_interval_missing_from_its_days_settlement() -> None:
    bodies = stream_bodies()
    bodies[-1] = settlement(ACCT_B, "2026-12-02", ["B3"])
    records = build(bodies)
    assert problems_of(records) == [
        f"{where(records, 14)}: the interval 2026-12-02T15:00:00Z (line 12, seq 12, {records[11]['id']}) of "
        "2026-12-02 is missing from the settlement"
    ]


def test_a_settlement_entry_that_differs_from_its_record() -> None:
    bodies = stream_bodies()
    bodies[-1] = settlement(ACCT_B, "2026-12-02", ["B3", "B3n"])
    records = build(bodies)
    entries = records[-1]["intervals"]
    entries[1] = {**entries[1], "delta_kwh": "0.070000"}
    records[-1].update(net_kwh="0.070000", saving_kwh="0.070000")
    records[-1]["signature"] = sign(records[-1], KEY)
    assert problems_of(records) == [
        f"{where(records, 14)}: entry {records[11]['id']} (seq 12): differs from that record (line 12, seq 12, "
        f"{records[11]['id']}): delta_kwh 0.050000"
    ]


def test_a_spike_pair_without_its_flag() -> None:
    bodies = stream_bodies()
    b2 = labelled(bodies, "B2")  # unflagged, the 4.95 kWh jump would earn nothing but counts as measured
    b2.update(flags=[], status="measured", delta_kwh="-4.750000")
    b2["meters"][0]["flags"] = []
    records = build(bodies)
    assert problems_of(records) == [
        f"{where(records, 7)}: meter {METER_B}: flag spike missing: the pair 2026-12-01T00:05:00Z..2026-12-01T00:10:00Z"
        " advances 4.950000 kWh, above its limit 3.334333"
    ]


def test_an_outlier_that_is_not_an_outlier() -> None:
    bodies = stream_bodies()
    b3 = labelled(bodies, "B3")  # 70.10 between 70.08 and 70.12 is a plausible reading
    b3["meters"][0]["outliers"] = [{"ts": "2026-12-02T00:10:00Z", "kwh": "70.100000"}]
    records = build(bodies)
    assert problems_of(records) == [
        f"{where(records, 11)}: meter {METER_B}: outlier 70.100000 at 2026-12-02T00:10:00Z is not an outlier: "
        "the pairs around it are plausible and plausible, the pair without it is plausible"
    ]


def test_an_outlier_left_in_the_readings() -> None:
    bodies = stream_bodies()
    b3 = labelled(bodies, "B3")
    meter = b3["meters"][0]
    meter["readings"].insert(3, {"ts": "2026-12-02T00:10:00Z", "kwh": "0.000000"})
    meter["outliers"] = []
    # reset (nothing) then spike (70.12 counted): 0.04 + 0.04 + 0 + 70.12 + 0.03 = 70.23 kWh
    meter["kwh"] = b3["energy_kwh"] = "70.230000"
    meter["flags"] = b3["flags"] = ["reset", "spike"]
    records = build(bodies)
    assert problems_of(records) == [
        f"{where(records, 11)}: meter {METER_B}: the reading 0.000000 at 2026-12-02T00:10:00Z is an outlier but is "
        "listed in readings, not in outliers"
    ]


# Thursday 00:00Z, account B (fixed baseline 0.3 kWh, 40 kW, no wrap): readings -> (energy, flag, status).
# Limits: 5 min 3.334333 kWh, 15 min 10.001 kWh.
FLAG_CASES: dict[str, tuple[list[tuple[str, str]], str, str, str]] = {
    # 90.05 -> 10.00: the counter went back, no wrap configured: that pair counts nothing; 0.05 + 0 + 0.05
    "reset": ([("00:00", "90.000000"), ("00:05", "90.050000"), ("00:10", "10.000000"), ("00:15", "10.050000")],
              "0.100000", "reset", "flagged"),
    # swap at 00:07 (programme: old final 90.08, new initial 0): (90.08 - 90.05) + (0.02 - 0) = 0.05 in that pair
    "replacement": ([("00:00", "90.000000"), ("00:05", "90.050000"), ("00:10", "0.020000"), ("00:15", "0.070000")],
                    "0.150000", "replacement", "flagged"),
    # the last reading is before the end and none came after: the interval closed without its edge
    "gap (no reading after the end)": ([("00:00", "90.000000"), ("00:05", "90.050000"), ("00:10", "90.100000")],
                                       "0.100000", "gap", "incomplete"),
    # one pair over 15 minutes: longer than max_gap_s 300
    "gap (a long pair)": ([("00:00", "90.000000"), ("00:15", "90.150000")], "0.150000", "gap", "incomplete"),
    # frozen at 90 from 23:58 to 00:14 (16 min, longer than one interval), then 0.04 in 4 min: 1/4 of it before 00:15
    "stuck (a frozen run)": ([("2026-12-02T23:58:00Z", "90.000000"), ("00:02", "90.000000"), ("00:06", "90.000000"),
                              ("00:10", "90.000000"), ("00:14", "90.000000"), ("00:18", "90.040000")],
                             "0.010000", "stuck", "flagged"),
    # not a µkWh in 15 minutes while the baseline expects 0.3
    "stuck": ([("00:00", "90.000000"), ("00:05", "90.000000"), ("00:10", "90.000000"), ("00:15", "90.000000")],
              "0.000000", "stuck", "flagged"),
    # 2**20 kWh is a float32 whose next neighbour is 0.125 kWh away: coarser than 0.1 x 0.3 kWh
    "resolution": ([("00:00", "1048576.000000"), ("00:05", "1048576.125000"), ("00:10", "1048576.125000"),
                    ("00:15", "1048576.250000")], "0.250000", "resolution", "flagged"),
}  # fmt: skip


def _thursday(case: str, *, honest: bool) -> list[dict[str, Any]]:
    readings, kwh, flag, status = FLAG_CASES[case]
    bodies = stream_bodies()
    if flag == "replacement":
        swap = {"at": "2026-12-03T00:07:00Z", "old_final_kwh": "90.080000", "new_initial_kwh": "0.000000"}
        body = programme()
        body["accounts"][1]["meters"][0]["replacements"] = [swap]
        bodies[0] = epoch(body)
    stamped = [(t if "T" in t else f"2026-12-03T{t}:00Z", k) for t, k in readings]
    if honest:
        record = _b4("2026-12-03T00:00:00Z", "B4", stamped, kwh=kwh, status=status, flags=(flag,))
    else:  # the flag left out: measured, and the delta the baseline gives
        delta = f"{Decimal('0.3') - Decimal(kwh):.6f}"
        record = _b4("2026-12-03T00:00:00Z", "B4", stamped, kwh=kwh, status="measured", delta=delta)
    return build([*bodies, record])


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_each_derivable_flag_is_accepted_when_present_and_reported_when_missing(case: str) -> None:
    assert problems_of(_thursday(case, honest=True)) == []
    records = _thursday(case, honest=False)
    problems = problems_of(records)
    flag = FLAG_CASES[case][2]
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{where(records, 15)}: meter {METER_B}: flag {flag} missing: ")


def _thursday_b(readings: list[str], kwh: str, **kwargs: Any) -> list[dict[str, Any]]:
    stamped = list(zip([f"2026-12-03T00:{m:02d}:00Z" for m in (0, 5, 10, 15)], readings, strict=True))
    return build([*stream_bodies(), _b4("2026-12-03T00:00:00Z", "B4", stamped, kwh=kwh, **kwargs)])


def test_a_float32_step_counts_only_when_every_reading_is_a_float32() -> None:
    mixed = ["1048576.000000", "1048576.125000", "1048576.200000", "1048576.250000"]  # 1048576.2 is no float32
    assert problems_of(_thursday_b(mixed, "0.250000", status="measured", delta="0.050000")) == []
    records = _thursday_b(mixed, "0.250000", status="flagged", flags=("resolution",))
    assert problems_of(records) == [
        f"{where(records, 15)}: meter {METER_B}: flag resolution is not derivable from its readings"
    ]


def test_stuck_may_be_declared_only_for_a_run_that_goes_on_beyond_the_readings() -> None:
    ends_equal = ["90.000000", "90.050000", "90.100000", "90.100000"]  # the gateway saw the run go on
    assert problems_of(_thursday_b(ends_equal, "0.100000", status="flagged", flags=("stuck",))) == []
    moving = ["90.000000", "90.050000", "90.100000", "90.150000"]
    records = _thursday_b(moving, "0.150000", status="flagged", flags=("stuck",))
    assert problems_of(records) == [
        f"{where(records, 15)}: meter {METER_B}: flag stuck is not derivable from its readings"
    ]


def test_a_rollover_without_its_note_and_an_allocation_that_takes_too_much() -> None:
    bodies = stream_bodies()
    labelled(bodies, "A3").update(notes=[])
    labelled(bodies, "A3")["meters"][0]["notes"] = []
    a2 = labelled(bodies, "A2")["meters"][0]
    a2["allocated_kwh"] = "0.030000"  # 10000 µkWh more than cum(c0, c1, start): gap, and less energy
    a2["kwh"] = "0.140000"
    labelled(bodies, "A2").update(energy_kwh="0.140000", delta_kwh="0.160000")
    records = build(bodies)
    problems = problems_of(records)
    assert f"{where(records, 10)}: meter {METER_A}: note rollover missing" in problems
    assert (
        f"{where(records, 6)}: meter {METER_A}: flag gap missing: allocated_kwh 0.030000 is not cum(c0, c1, start) "
        "= 0.020000"
    ) in problems


def test_a_bad_signature() -> None:
    records = build(stream_bodies())
    records[2] = {**records[2], "delta_kwh": "0.300000"}
    assert problems_of(records) == [f"{where(records, 3)}: bad signature: the record was changed after it was signed"]


def test_a_broken_chain() -> None:
    records = build(stream_bodies())
    records[5] = {**records[5], "prev_hash": "1" * 64}
    records[5]["signature"] = sign(records[5], KEY)
    assert problems_of(records) == [
        f"{where(records, 6)}: hash chain broken: prev_hash is not the hash of seq 5 (line 5)",
        f"{where(records, 7)}: hash chain broken: prev_hash is not the hash of seq 6 (line 6)",
    ]


def test_a_seq_gap() -> None:
    records = build(stream_bodies())
    del records[6]
    assert problems_of(records) == ["gap: seq 7 missing (1 record(s))"]


def test_a_duplicate_json_key() -> None:
    records = build(stream_bodies())
    text = lines(records)
    text[-1] = b'{"saving_kwh":"9.000000",' + text[-1][1:]
    assert verify_lines(text, [PUBLIC]).problems == ["line 14: duplicate JSON key 'saving_kwh'"]


def test_replays_same_ids_envelopes_and_foreign_keys() -> None:
    records = build(stream_bodies())
    text = lines(records)
    envelope = orjson.dumps({"id": records[0]["id"], "type": "incentive", "body": records[0]})
    other = {**records[3], "net_kwh": "1.000000"}
    report = verify_lines([envelope, *text[1:], text[2], orjson.dumps(other), b"", b"{oops"], [PUBLIC])
    assert report.problems == [
        f"line 15 (seq 3, {records[2]['id']}): replayed record, identical to line 3",
        f"line 16 (seq 4, {records[3]['id']}): a different record with the same id as line 4",
        "line 18: not valid JSON",
    ]
    stranger = Ed25519PrivateKey.generate().public_key()
    assert verify_lines(text, [stranger]).problems == [
        f"14 record(s) signed by key {key_id(PUBLIC)}, not by the given key ({key_id(stranger)}): "
        "lines 1, 2, 3, 4, 5, ..."
    ]


def test_an_unsigned_figure_is_never_trusted_even_resigned_by_another_key() -> None:
    records = build(stream_bodies())
    forged = {**records[8], "saving_kwh": "9.000000"}
    forged["signature"] = sign(forged, Ed25519PrivateKey.generate())  # claims the real key_id
    records[8] = forged
    assert problems_of(records) == [f"{where(records, 9)}: bad signature: the record was changed after it was signed"]


def test_a_non_canonical_signature_spelling_is_refused() -> None:
    records = build(stream_bodies())
    last = records[-1]["signature"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    low_bits = alphabet.index(last[-1]) & 0b1111  # the last character's 4 unused bits
    respelt = last[:-1] + alphabet[(alphabet.index(last[-1]) & ~0b1111) | (low_bits ^ 1)]
    records[-1] = {**records[-1], "signature": respelt}
    assert problems_of(records) == [
        f"{where(records, 14)}: the signature is not written as canonical base64url (its hash would vary)"
    ]


# -- epochs and partial exports --------------------------------------------------------------------------------


def two_epochs() -> list[dict[str, Any]]:
    """Day 1, then an operator starts epoch 2 (the night factor changes), then Tuesday under epoch 2."""
    bodies = stream_bodies()
    first = hashlib.sha256(orjson.dumps(programme(), option=orjson.OPT_SORT_KEYS)).hexdigest()
    second = programme()
    second["emission_factor"]["by_time_of_day"][0]["kg_per_kwh"] = "0.50"
    return [*bodies[:5], epoch(second, number=2, previous=first), *bodies[5:9]]


def test_a_new_epoch_and_a_partial_export_from_it() -> None:
    records = build(two_epochs())
    assert [r["epoch"] for r in records] == [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert problems_of(records) == []
    # what `export --since 7` writes: the epoch record seq 6 (in force at 7), then 7..; and from 6 itself
    assert problems_of(records[5:], from_seq=7) == []
    assert problems_of(records[5:], from_seq=6) == []
    assert problems_of([records[5], *records[7:]], from_seq=8) == []
    assert problems_of(records[6:], from_seq=7) == [
        "the stream must start with the epoch record in force at seq 7 (as `incentives export --since 7` writes "
        f"it), but starts with line 1 (seq 7, {records[6]['id']}), kind interval"
    ]


def test_a_partial_export_from_the_genesis_and_a_gap_after_from_seq() -> None:
    records = build(stream_bodies())
    partial = [records[0], *records[5:]]
    assert problems_of(partial, from_seq=6) == []
    assert problems_of(partial)[0] == "gap: seq 2..5 missing (4 record(s))"
    assert problems_of([records[0], *records[6:]], from_seq=6) == ["gap: seq 6 missing (1 record(s))"]


def test_records_under_an_epoch_must_name_it() -> None:
    bodies = two_epochs()
    records = build(bodies)
    records[7] = {**records[7], "epoch": 1, "programme": records[0]["programme"]}
    records[7]["signature"] = sign(records[7], KEY)
    for later in range(8, len(records)):  # re-chain
        records[later]["prev_hash"] = record_hash(records[later - 1])
        records[later]["signature"] = sign(records[later], KEY)
    problems = problems_of(records)
    assert problems[0] == (
        f"{where(records, 8)}: epoch 1 / programme {records[0]['programme'][:12]}... is not the epoch in force "
        f"(2 / {records[5]['programme'][:12]}...)"
    )


# -- property: nothing changes unseen ------------------------------------------------------------------------

CLEAN = lines(build(stream_bodies()))
CHECKPOINT = checkpoint_for(build(stream_bodies()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_single_byte_change_of_a_signed_stream_is_reported(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(CLEAN) - 1), label="line")
    line = CLEAN[index]
    position = data.draw(st.integers(0, len(line) - 1), label="byte")
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != line[position]), label="new byte")
    changed = [*CLEAN[:index], line[:position] + bytes([byte]) + line[position + 1 :], *CLEAN[index + 1 :]]
    assert verify_lines(changed, [PUBLIC], checkpoint=CHECKPOINT).problems


FIGURES = {
    "interval": ["energy_kwh", "delta_kwh", "saving_kwh", "co2e_kg", "co2e_delta_kg", "co2e_saved_kg",
                 "meters.0.kwh", "meters.0.allocated_kwh", "meters.0.readings.0.kwh",
                 "baseline.kwh", "emission_factor_kg_per_kwh"],
    "settlement": ["net_kwh", "saving_kwh", "co2e_saved_kg", "intervals.0.delta_kwh", "intervals.0.co2e_delta_kg"],
}  # fmt: skip


def _set_path(record: dict[str, Any], path: str, change: Callable[[str], str]) -> bool:
    *parents, last = path.split(".")
    node: Any = record
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.get(part)
        if node is None:
            return False
    key: Any = int(last) if isinstance(node, list) else last
    if isinstance(node, dict) and not isinstance(node.get(key), str):
        return False
    node[key] = change(node[key])
    return True


# (not the last reading: one after the end counts only through a floor division, so a change of a few µkWh may
# leave every figure right; the first reading's pair is counted whole or sets the allocation)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_changed_figure_is_reported_even_when_resigned_and_rechained(data: st.DataObject) -> None:
    """A gateway bug signs wrong figures as readily as right ones: every figure is re-derived."""
    records = build(stream_bodies())
    index = data.draw(st.sampled_from([i for i, r in enumerate(records) if r["kind"] != "epoch"]), label="record")
    record = json.loads(json.dumps(records[index]))
    path = data.draw(st.sampled_from(FIGURES[record["kind"]]), label="figure")
    step = data.draw(st.integers(1, 5_000_000).map(lambda n: Decimal(n) / 1_000_000), label="by")

    def change(text: str) -> str:
        return (
            f"{Decimal(text) + step:.6f}"
            if text.count(".") == 1 and len(text.split(".")[1]) == 6
            else f"{Decimal(text) + step}"
        )

    if not _set_path(record, path, change):
        return  # e.g. a null baseline
    record["signature"] = sign(record, KEY)
    records[index] = record
    for later in range(index + 1, len(records)):
        records[later]["prev_hash"] = record_hash(records[later - 1])
        records[later]["signature"] = sign(records[later], KEY)
    assert problems_of(records), (index, path, step)


# -- checkpoints -----------------------------------------------------------------------------------------------


def test_make_checkpoint_and_its_problems() -> None:
    records = build(stream_bodies())
    checkpoint = checkpoint_for(records)
    assert checkpoint["schema"] == CHECKPOINT_SCHEMA_ID
    assert checkpoint["ts"] == "2026-12-02T08:26:40Z"  # whole seconds, truncated
    assert checkpoint_problems(checkpoint, [PUBLIC]) == []
    stranger = Ed25519PrivateKey.generate().public_key()
    assert checkpoint_problems(checkpoint, [stranger]) == [
        f"the checkpoint is signed by key {key_id(PUBLIC)}, not by the given key ({key_id(stranger)})"
    ]
    assert checkpoint_problems({**checkpoint, "seq": True}, [PUBLIC]) == [
        "the checkpoint member 'seq' has the wrong type"
    ]
    assert checkpoint_problems([], [PUBLIC]) == ["the checkpoint is not a JSON object"]


# -- the commands ----------------------------------------------------------------------------------------------


@dataclass
class Files:
    records: Path
    public: Path
    checkpoint: Path


@pytest.fixture
def files(tmp_path: Path) -> Files:
    records = build(stream_bodies())
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"\n".join(lines(records)) + b"\n")
    public = tmp_path / "gw.pub.pem"
    public.write_bytes(PUBLIC.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    checkpoint = tmp_path / "checkpoint.json"
    checkpoint.write_bytes(orjson.dumps(checkpoint_for(records)))
    return Files(path, public, checkpoint)


def test_cli_verify_exit_codes_and_one_line_per_problem(files: Files, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["incentives", "verify", str(files.records), "--public-key", str(files.public)]
    assert main([*args, "--checkpoint", str(files.checkpoint)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("ok: 14 record(s)") and "checkpoint at seq 14 matches" in out

    kept = files.records.read_bytes().splitlines()[:12]
    files.records.write_bytes(b"\n".join(kept) + b"\n")
    assert main([*args, "--checkpoint", str(files.checkpoint)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "tail missing: seq 13..14\n"
    assert "FAILED: 1 problem(s) in 12 record(s)" in captured.err


def test_cli_verify_bad_inputs(files: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_json = tmp_path / "cp.json"
    not_json.write_text("{")
    args = ["incentives", "verify", str(files.records), "--public-key", str(files.public)]
    assert main([*args, "--checkpoint", str(not_json)]) == 1
    assert "is not valid JSON" in capsys.readouterr().err
    assert main(["incentives", "verify", str(tmp_path / "none.jsonl"), "--public-key", str(files.public)]) == 1
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--from-seq", "0"])


def make_ledger(path: Path, records: list[dict[str, Any]], checkpoint: dict[str, Any] | None) -> sqlite3.Connection:
    """A ledger with the layout the stage writes (records, meta); left open in WAL mode like a running gateway."""
    ledger = sqlite3.connect(path, isolation_level=None)
    ledger.execute("PRAGMA journal_mode=WAL")
    ledger.execute("CREATE TABLE records (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, kind TEXT NOT NULL, "
                   "body BLOB NOT NULL, account TEXT)")  # fmt: skip
    ledger.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    ledger.execute("BEGIN")
    for record in records:
        ledger.execute(
            "INSERT INTO records (seq, id, kind, body) VALUES (?, ?, ?, ?)",
            (record["seq"], record["id"], record["kind"], orjson.dumps(record, option=orjson.OPT_SORT_KEYS)),
        )
    if checkpoint is not None:
        ledger.execute("INSERT INTO meta VALUES ('checkpoint', ?)", (orjson.dumps(checkpoint).decode(),))
    ledger.execute("COMMIT")
    return ledger


def test_export_then_verify_with_the_checkpoint(
    files: Files, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    records = build(two_epochs())
    ledger = make_ledger(tmp_path / "incentives.db", records, checkpoint_for(records))
    try:
        assert main(["incentives", "export", "--data-dir", str(tmp_path)]) == 0
        assert capsysbinary.readouterr().out == b"\n".join(lines(records)) + b"\n"
        out, cp = tmp_path / "export.jsonl", tmp_path / "cp.json"
        assert main(["incentives", "export", "--data-dir", str(tmp_path), "--out", str(out), "--checkpoint-out",
                     str(cp)]) == 0  # fmt: skip
        assert b"exported 10 record(s), seq 1..10" in capsysbinary.readouterr().err
        assert verify_lines(out.read_bytes().splitlines(), [PUBLIC], checkpoint=orjson.loads(cp.read_bytes())).ok

        # --since 8: the epoch record in force (seq 6) first, then 8..10
        assert main(["incentives", "export", "--data-dir", str(tmp_path), "--since", "8", "--out", str(out)]) == 0
        assert [orjson.loads(x)["seq"] for x in out.read_bytes().splitlines()] == [6, 8, 9, 10]
        assert main(["incentives", "verify", str(out), "--public-key", str(files.public), "--from-seq", "8",
                     "--checkpoint", str(cp)]) == 0  # fmt: skip
        assert main(["incentives", "verify", str(out), "--public-key", str(files.public)]) == 1
        assert b"the first records are missing: the stream starts at seq 6" in capsysbinary.readouterr().out

        # a record the running gateway commits now is in the next export (WAL, read-only reader)
        extra = build([*two_epochs(), settlement(ACCT_B, "2026-12-01", ["B2"])])[-1]
        body = orjson.dumps(extra, option=orjson.OPT_SORT_KEYS)
        ledger.execute("INSERT INTO records (seq, id, kind, body) VALUES (?, ?, ?, ?)",
                       (extra["seq"], extra["id"], extra["kind"], body))  # fmt: skip
        assert main(["incentives", "export", "--data-dir", str(tmp_path), "--since", "11"]) == 0
        assert [orjson.loads(x)["seq"] for x in capsysbinary.readouterr().out.splitlines()] == [6, 11]
    finally:
        ledger.close()
    assert main(["incentives", "export", "--data-dir", str(tmp_path), "--since", "2"]) == 0  # gateway stopped
    assert [orjson.loads(x)["seq"] for x in capsysbinary.readouterr().out.splitlines()] == list(range(1, 12))


def test_export_refuses_a_missing_ledger_and_a_missing_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["incentives", "export", "--data-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"error: no incentive ledger at {tmp_path / 'incentives.db'} (is --data-dir the gateway's data directory?)\n"
    )
    assert not (tmp_path / "incentives.db").exists()
    make_ledger(tmp_path / "incentives.db", build(stream_bodies()), None).close()
    cp = tmp_path / "cp.json"
    assert main(["incentives", "export", "--data-dir", str(tmp_path), "--checkpoint-out", str(cp)]) == 1
    err = capsys.readouterr().err
    assert "holds no checkpoint yet" in err and err.count("\n") == 1
    assert not cp.exists()


def _cli(*args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parents[1])}
    return subprocess.Popen([sys.executable, "-m", "gateway", *args], env=env, stderr=subprocess.PIPE, **kwargs)


def test_export_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    bodies = stream_bodies()
    day = bodies[1]
    many = [bodies[0]] + [
        {
            **day,
            "_label": f"x{n}",
            "interval": {**day["interval"], "start": _iso(_ns("2026-11-30T00:00:00Z") + n * 900)},
        }
        for n in range(1, 800)
    ]
    records = build(many)  # figures do not matter here; only the volume (well over a pipe buffer)
    make_ledger(tmp_path / "incentives.db", records, None).close()
    with _cli("incentives", "export", "--data-dir", str(tmp_path), stdout=subprocess.PIPE) as reader:
        assert reader.stdout is not None and reader.stderr is not None
        reader.stdout.readline()
        reader.stdout.close()  # like `| head -1`
        assert reader.wait(timeout=60) in (0, 141, -signal.SIGPIPE)
        assert reader.stderr.read() == b""


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_ctrl_c_exits_130_without_a_traceback(files: Files) -> None:
    args = ("incentives", "verify", "-", "--public-key", str(files.public))
    with _cli(*args, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as waiting:
        assert waiting.stdin is not None and waiting.stderr is not None
        waiting.stdin.write(lines(build(stream_bodies()))[0] + b"\n")
        waiting.stdin.flush()
        _wait_until_reading_stdin(waiting.pid)  # a SIGINT during interpreter start-up would be another story
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(timeout=30) == 130
        assert b"Traceback" not in waiting.stderr.read()


def _wait_until_reading_stdin(pid: int) -> None:
    """Polls /proc until the process blocks in read(0, ...): then it is inside the command, waiting for input."""
    read_syscall = {"x86_64": "0", "aarch64": "63"}.get(os.uname().machine)
    if read_syscall is None:
        pytest.skip("read(2) syscall number unknown on this machine")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            fields = Path(f"/proc/{pid}/syscall").read_text().split()
        except OSError:
            fields = []
        if fields[:2] == [read_syscall, "0x0"]:
            return
        time.sleep(0.02)
    pytest.fail("the command never blocked reading its standard input")


def test_cli_verify_refuses_a_file_that_is_not_a_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("hello")
    assert main(["incentives", "verify", str(tmp_path / "none.jsonl"), "--public-key", str(not_a_key)]) == 1
    assert "is not a PEM public key" in capsys.readouterr().err


def test_keys_generate_writes_private_files_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.incentives.record import load_public_key

    out = tmp_path / "keys"
    assert main(["keys", "generate", "--out", str(out)]) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == {
        "incentive-signing.pem": 0o600,
        "incentive-signing.pub.pem": 0o600,
        "incentive-pseudonym.key": 0o600,
    }
    assert load_public_key(out / "incentive-signing.pub.pem") is not None
    capsys.readouterr()
    assert main(["keys", "generate", "--out", str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=12)
    | st.sampled_from(["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "0.000000", "-1.000000", "1e9", "23:00"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in children:
        found += _paths(child, (*prefix, key))
    return found


@contextmanager
def hang_guard(seconds: float = 10.0) -> Iterator[None]:
    """Ends the test process with every thread's stack when verify has not returned within ``seconds``: a hang
    inside one C call (``set(range(1, 2**62))``) lets no signal handler run, and a hung run once cost 20 minutes.
    pytest's capture swallows the stack: rerun the failing test with ``-s`` to see where verify hung."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_signed_garbage_anywhere_is_reported_never_a_crash(data: st.DataObject) -> None:
    """A gateway bug may sign any shape: every one is a problem line, never an exception."""
    records = build(stream_bodies())
    index = data.draw(st.integers(0, len(records) - 1), label="record")
    record = json.loads(json.dumps(records[index]))
    path = data.draw(st.sampled_from([p for p in _paths(record) if p[0] not in ("signature", "key_id")]), label="at")
    *parents, last = path
    node: Any = record
    for part in parents:
        node = node[part]
    if data.draw(st.booleans(), label="delete") and isinstance(node, dict):
        del node[last]
    else:
        node[last] = data.draw(JSON_VALUES, label="value")
    record["signature"] = sign(record, KEY)
    records[index] = record
    for later in range(index + 1, len(records)):
        records[later]["prev_hash"] = record_hash(records[later - 1])
        records[later]["signature"] = sign(records[later], KEY)
    with hang_guard():
        problems_of(records, checkpoint=CHECKPOINT)  # must not raise (a no-op change may even be clean)


def test_times_at_the_calendar_edge_and_absurd_zones_are_problems_not_crashes() -> None:
    """Found by the property above run long: datetime overflows in local time, a zone name too long for a path."""
    bodies = stream_bodies()
    labelled(bodies, "A2")["interval"]["start"] = "9999-12-31T23:45:00Z"  # + 8 h leaves the calendar
    labelled(bodies, "A3")["baseline"]["days"][0]["start"] = "9999-12-31T23:45:00Z"
    records = build(bodies)
    problems = problems_of(records)
    assert (
        f"{where(records, 10)}: baseline day 9999-12-31T23:45:00Z is outside the calendar in Asia/Shanghai" in problems
    )
    assert any(p.startswith(f"{where(records, 6)}: local_start") for p in problems)
    records = build([epoch(programme(timezone="A" * 300)), *stream_bodies()[1:]])
    assert problems_of(records)[0] == f"{where(records, 1)}: malformed: timezone {'A' * 300!r} is not a known IANA zone"
