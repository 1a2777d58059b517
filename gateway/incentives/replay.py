"""``edge-gateway incentives test`` and ``edge-gateway incentives new-epoch``: the stage driven by an operator.

``test`` replays recorded meter readings through the real incentive stage on a simulated clock, in a throw-away
ledger, and prints what would have been issued, so a programme can be tried before it pays anyone. ``new-epoch``
starts a new programme epoch in a gateway's ledger on purpose (the gateway refuses a changed programme otherwise).

Readings CSV: ``time,point,value[,received]`` with a header, ``#`` comments allowed. ``time`` is the reading's
stamp, ``received`` when the gateway got it (default: ``time``); rows are replayed in ``received`` order and the
simulated gateway clock is ``received``, so late, out-of-order and future-stamped readings can be written down.
Times are ISO 8601 (naive means the site's zone).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from gateway.errors import ConfigError, Diagnostic, GatewayError
from gateway.model import Sample


def add_commands(inc_sub: Any) -> None:
    test = inc_sub.add_parser(
        "test",
        help="replay recorded meter readings through the incentive stage and print what would be issued",
        description="Replays readings (CSV time,point,value[,received]) through the real incentive stage of SITE on "
        "a simulated clock, in a temporary ledger with throw-away keys (or --keys DIR), then prints each record and "
        "a summary: records issued, kWh paid, flagged intervals by flag, refused readings by reason.",
    )
    test.add_argument("site", type=Path, metavar="SITE.yaml")
    test.add_argument("--data", type=Path, required=True, metavar="READINGS.csv")
    test.add_argument("--jsonl", action="store_true", help="print the signed records as JSON Lines (for verify)")
    test.add_argument(
        "--keys", type=Path, metavar="DIR", help="sign with incentive-signing.pem and incentive-pseudonym.key in DIR"
    )
    test.set_defaults(handler=_reported(_test))

    epoch = inc_sub.add_parser(
        "new-epoch",
        help="start a new programme epoch in a gateway's ledger (after changing money settings or keys)",
        description="Writes an epoch record carrying the site's current programme into the ledger's chain. Run it "
        "with the gateway stopped, after changing interval, limits, baseline, emission factors or the pseudonym "
        "key; the gateway refuses to start on a changed programme until then. The record reaches the platform when "
        "the gateway next starts.",
    )
    epoch.add_argument("site", type=Path, metavar="SITE.yaml")
    epoch.add_argument("--data-dir", type=Path, help="the gateway's data directory (default: as `run` uses)")
    epoch.add_argument("--reason", required=True, help="why, in words the platform will read (e.g. 'tariff 2027')")
    epoch.set_defaults(handler=_reported(_new_epoch))


def _reported(handler: Any) -> Any:
    """Config problems as ``file:line:col`` lines and exit 1; a refused ledger or data directory as one line, 3."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args))
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        except GatewayError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3

    return run


# -- incentives test --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    received_ns: int
    sample: Sample


def read_readings(path: Path, zone: ZoneInfo) -> list[Row]:
    """The CSV as rows in arrival order; ConfigError naming every bad row at once."""
    from rules.replay import parse_time

    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Diagnostic(name, 0, 0, f"cannot read readings: {exc}")]) from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.startswith("#")]
    if not lines:
        raise ConfigError([Diagnostic(name, 0, 0, "no readings")])
    header_no, header_line = lines[0]
    header = [h.strip() for h in next(csv.reader([header_line]))]
    if header not in (["time", "point", "value"], ["time", "point", "value", "received"]):
        raise ConfigError(
            [Diagnostic(name, header_no, 1, "the header must be time,point,value[,received]", header_line)]
        )
    rows: list[Row] = []
    errors: list[Diagnostic] = []
    for number, line in lines[1:]:
        fields = [f.strip() for f in next(csv.reader([line]))]
        try:
            if len(fields) != len(header):
                raise ValueError(f"expected {len(header)} fields, got {len(fields)}")
            stamp = parse_time(fields[0], zone, None)
            received = parse_time(fields[3], zone, None) if len(fields) == 4 and fields[3] else stamp
            rows.append(Row(received, Sample(fields[1], _number(fields[2]), stamp)))
        except ValueError as exc:
            errors.append(Diagnostic(name, number, 1, str(exc), line))
    if errors:
        raise ConfigError(errors)
    rows.sort(key=lambda row: row.received_ns)  # stable: rows received together keep their file order
    return rows


def _number(text: str) -> float | int | str:
    """The value as written: a number when it is one (the stage refuses the rest, counted, like the gateway)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _test(args: argparse.Namespace) -> int:
    from gateway.config.site import load_site
    from gateway.incentives.record import write_pseudonym_key, write_signing_key
    from gateway.incentives.stage import IncentiveStage

    site = load_site(args.site)
    config = site.config.incentives
    if config is None:
        raise ConfigError([site.diagnostic((), "the site file has no incentives: section to test")])
    logging.getLogger("gateway.incentives").setLevel(logging.WARNING)  # the records are the output, not the log
    zone = ZoneInfo(config.timezone or site.config.gateway.timezone)
    rows = read_readings(args.data, zone)
    unknown = sorted({row.sample.point for row in rows} - {m for a in config.accounts for m in a.meters})
    with tempfile.TemporaryDirectory(prefix="incentives-test-") as tmp:
        data_dir = Path(tmp)
        if args.keys is not None:
            keys = (args.keys / "incentive-signing.pem", args.keys / "incentive-pseudonym.key")
        else:
            keys = (data_dir / "keys" / "signing.pem", data_dir / "keys" / "pseudonym.key")
            write_signing_key(keys[0], data_dir / "keys" / "signing.pub.pem")
            write_pseudonym_key(keys[1])
        stage = IncentiveStage.open(site, data_dir, key_files=keys)
        try:
            issued = []
            for row in rows:
                issued += stage.process([row.sample], row.received_ns)
            # let every interval close: past the last reading by max_delay and one more interval
            end = rows[-1].received_ns + int((config.max_delay + config.interval) * 1e9) + 1
            while batch := stage.tick(end):
                issued += batch
            counters = dict(stage.counters)
        finally:
            stage.close()
    records = [e.body for e in issued if e.type == "incentive"]
    names = {stage_account.pseudonym: stage_account.real_id for stage_account in stage.accounts}
    out = sys.stdout
    for record in records:
        if args.jsonl:
            out.write(orjson.dumps(record, option=orjson.OPT_SORT_KEYS).decode() + "\n")
        else:
            out.write(_line(record, names) + "\n")
    print(_summary(records, counters, unknown), file=sys.stderr if args.jsonl else out)
    return 0


def _line(record: dict[str, Any], names: dict[str, str]) -> str:
    kind = record["kind"]
    if kind == "epoch":
        return f"{record['seq']:>5} epoch {record['epoch']}  {record['reason']}"
    account = names.get(record["account"], record["account"])
    if kind == "settlement":
        return (
            f"{record['seq']:>5} settle {record['day']}  {account}  {len(record['intervals'])} intervals  "
            f"net {record['net_kwh']} kWh  saving {record['saving_kwh']} kWh"
        )
    baseline = record["baseline"]["kwh"] if record["baseline"] else "-"
    flags = ",".join(record["flags"]) or "-"
    return (
        f"{record['seq']:>5} {record['interval']['local_start'][:16]}  {account}  {record['status']:<11} "
        f"flags {flags:<14} energy {record['energy_kwh']}  baseline {baseline}  saving {record['saving_kwh']}"
    )


def _summary(records: list[dict[str, Any]], counters: dict[str, int], unknown: list[str]) -> str:
    kinds = Counter(r["kind"] for r in records)
    paid = sum(int(r["saving_kwh"].replace(".", "")) for r in records if r["kind"] in ("interval", "settlement"))
    flags = Counter(flag for r in records if r["kind"] == "interval" for flag in r["flags"])
    flagged = sum(1 for r in records if r["kind"] == "interval" and r["flags"])
    by_flag = ", ".join(f"{name} {count}" for name, count in sorted(flags.items())) or "none"
    refused = ", ".join(f"{name} {count}" for name, count in sorted(counters.items()) if count) or "none"
    text = (
        f"summary: {len(records)} records ({kinds['interval']} interval, {kinds['settlement']} settlement, "
        f"{kinds['epoch']} epoch), {paid / 1_000_000:.6f} kWh paid, {flagged} flagged intervals ({by_flag}), "
        f"readings refused or ignored: {refused}"
    )
    if unknown:
        text += f"; not meters of any account (ignored): {', '.join(unknown)}"
    return text


# -- incentives new-epoch ---------------------------------------------------------------------------------------


def _new_epoch(args: argparse.Namespace) -> int:
    from gateway.commands import default_data_dir
    from gateway.config.site import load_site
    from gateway.files import DataDirLock
    from gateway.incentives.stage import IncentiveStage

    site = load_site(args.site)
    data_dir = args.data_dir or default_data_dir(site)
    if not (data_dir / "incentives.db").exists():
        raise GatewayError(f"no incentive ledger in {data_dir}: a new gateway starts its first epoch by itself")
    with DataDirLock(data_dir):  # never beside a running gateway: it would be a second writer of the chain
        stage = IncentiveStage.open(site, data_dir, new_epoch_reason=args.reason)
        try:
            records = [e.body for e in stage.start_epoch(time.time_ns()) if e.type == "incentive"]
        finally:
            stage.close()
    for record in records:
        print(f"epoch {record['epoch']} started at seq {record['seq']}: {record['reason']}")
        print(f"programme {record['programme']} (was {record['previous_programme']})")
    return 0
