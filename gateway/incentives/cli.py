"""``edge-gateway incentives verify|export`` and ``edge-gateway keys generate``.

Owns argument parsing and output of these commands; the checks live in ``verify``, the key files and checkpoints in
``record``. ``verify`` never opens the ledger (it needs only the records and a public key); ``export`` opens it
read-only (``mode=ro``), so it runs beside a running gateway and never creates or changes the file.

Each sub-command is added by its own ``_add_*`` function, so other ``incentives`` sub-commands can join
``register`` without touching these.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from gateway.incentives.record import (
    PSEUDONYM_KEY_NAME,
    PUBLIC_KEY_NAME,
    SIGNING_KEY_NAME,
    KeyFileError,
    key_id,
    load_public_key,
    write_pseudonym_key,
    write_signing_key,
)

LEDGER_NAME = "incentives.db"


def register(subparsers: Any) -> None:
    incentives = subparsers.add_parser("incentives", help="low-carbon incentive records")
    inc_sub = incentives.add_subparsers(dest="incentives_command", metavar="COMMAND", required=True)
    _add_verify(inc_sub)
    _add_export(inc_sub)
    from gateway.incentives.replay import add_commands  # test, new-epoch: they drive the stage itself

    add_commands(inc_sub)

    keys = subparsers.add_parser("keys", help="incentive signing and pseudonym keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    _add_keys_generate(keys_sub)


# -- incentives verify -----------------------------------------------------------------------------------------


def _add_verify(inc_sub: Any) -> None:
    verify = inc_sub.add_parser(
        "verify",
        help="re-check a record stream: signatures, chain, gaps, duplicates, every figure, settlements, checkpoint",
        description="Verify incentive records (JSON Lines: records or event envelopes; '-' reads standard input) "
        "against the specification in docs/incentives.md. Exit 0 with one summary line when every check passes, "
        "1 with one line per problem otherwise.",
    )
    verify.add_argument("records", metavar="RECORDS.jsonl", help="the records, one per line ('-' for stdin)")
    verify.add_argument(
        "--public-key",
        type=Path,
        action="append",
        required=True,
        metavar="KEY",
        help="the gateway's Ed25519 public key (PEM); repeat for records signed before a key rotation",
    )
    verify.add_argument(
        "--checkpoint",
        type=Path,
        metavar="FILE",
        help="a signed chain-head checkpoint (JSON): the stream must hold its seq with exactly its hash",
    )
    verify.add_argument(
        "--from-seq",
        type=_positive_int,
        metavar="N",
        help="the stream is a partial export (`incentives export --since N`): the epoch record in force, then "
        "records from seq N on",
    )
    verify.set_defaults(handler=_verify)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from exc
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _verify(args: argparse.Namespace) -> int:
    from gateway.incentives.verify import verify_lines

    try:
        keys = [load_public_key(path) for path in args.public_key]
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    checkpoint: Any = None
    if args.checkpoint is not None:
        try:
            checkpoint = orjson.loads(args.checkpoint.read_bytes())
        except OSError as exc:
            print(f"error: cannot read checkpoint {args.checkpoint}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        except orjson.JSONDecodeError:
            print(f"error: checkpoint {args.checkpoint} is not valid JSON", file=sys.stderr)
            return 1
        if isinstance(checkpoint, dict) and "signature" not in checkpoint and isinstance(checkpoint.get("body"), dict):
            checkpoint = checkpoint["body"]  # the retained MQTT message as received: its envelope carries it in body
    try:
        if args.records == "-":
            report = verify_lines(sys.stdin.buffer, keys, from_seq=args.from_seq, checkpoint=checkpoint)
        else:
            with Path(args.records).open("rb") as handle:
                report = verify_lines(handle, keys, from_seq=args.from_seq, checkpoint=checkpoint)
    except OSError as exc:
        print(f"error: cannot read {args.records}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for problem in report.problems:
        print(problem)
    if report.problems:
        print(f"FAILED: {len(report.problems)} problem(s) in {report.records} record(s)", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


# -- incentives export -----------------------------------------------------------------------------------------


def _add_export(inc_sub: Any) -> None:
    export = inc_sub.add_parser(
        "export",
        help="write the ledger's records as JSON Lines (what `incentives verify` reads)",
        description=f"Reads DIR/{LEDGER_NAME} read-only (safe while the gateway runs) and writes one canonical "
        "record per line in seq order. With --since N: the epoch record in force at N first, then the records "
        "from seq N on (verify it with --from-seq N).",
    )
    export.add_argument("--data-dir", type=Path, required=True, metavar="DIR", help="the gateway's data directory")
    export.add_argument("--since", type=_positive_int, metavar="SEQ", help="only records with seq >= SEQ")
    export.add_argument(
        "--checkpoint-out", type=Path, metavar="FILE", help="also write the ledger's latest checkpoint (JSON)"
    )
    export.add_argument("--out", type=Path, metavar="FILE", help="write the records here (default: standard output)")
    export.set_defaults(handler=_export)


class _ExportError(Exception):
    """The ledger cannot be exported; the message is the one line the user sees."""


def _export(args: argparse.Namespace) -> int:
    path: Path = args.data_dir / LEDGER_NAME
    try:
        with _open_ledger(path) as ledger:
            # one read transaction: the checkpoint and the records come from the same snapshot of the ledger
            ledger.execute("BEGIN")
            checkpoint = _stored_checkpoint(ledger) if args.checkpoint_out is not None else None
            if args.checkpoint_out is not None and checkpoint is None:
                raise _ExportError(
                    f"{path} holds no checkpoint yet (one is stored after the first records are issued); "
                    "run export without --checkpoint-out"
                )
            rows = _export_rows(ledger, args.since)
            try:
                if args.out is None:
                    seqs = _write_records(rows, sys.stdout.buffer)
                    sys.stdout.buffer.flush()
                else:
                    with _replace_atomically(args.out) as handle:
                        seqs = _write_records(rows, handle)
            finally:
                # finish the cursor while the connection is open: left to the garbage collector after a closed pipe,
                # it would print "Exception ignored ... closed database" on the way out
                rows.close()
            if checkpoint is not None:
                with _replace_atomically(args.checkpoint_out) as handle:
                    handle.write(checkpoint + b"\n")
    except _ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"error: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            raise  # the reader went away (`| head`): handled quietly by the CLI entry point
        print(f"error: cannot write the export: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if args.out is not None:
        print(f"exported {_describe(seqs, args.since)} to {args.out}", file=sys.stderr)
    if args.checkpoint_out is not None:
        print(f"checkpoint written to {args.checkpoint_out}", file=sys.stderr)
    return 0


@contextmanager
def _open_ledger(path: Path) -> Iterator[sqlite3.Connection]:
    if not path.is_file():
        raise _ExportError(f"no incentive ledger at {path} (is --data-dir the gateway's data directory?)")
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise _ExportError(f"cannot open {path} read-only: {exc}") from exc
    try:
        yield connection
    finally:
        connection.close()


def _stored_checkpoint(ledger: sqlite3.Connection) -> bytes | None:
    try:
        row = ledger.execute("SELECT value FROM meta WHERE key = 'checkpoint'").fetchone()
    except sqlite3.OperationalError:
        return None  # a ledger from before checkpoints has no meta table
    if row is None or row[0] is None:
        return None
    value = row[0]
    return (value.encode("utf-8") if isinstance(value, str) else bytes(value)).strip()


def _export_rows(ledger: sqlite3.Connection, since: int | None) -> Generator[tuple[int, Any], None, None]:
    if since is not None:
        epoch = ledger.execute(
            "SELECT seq, body FROM records WHERE kind = 'epoch' AND seq < ? ORDER BY seq DESC LIMIT 1", (since,)
        ).fetchone()
        if epoch is not None:
            yield epoch[0], epoch[1]
    yield from ledger.execute("SELECT seq, body FROM records WHERE seq >= ? ORDER BY seq", (since or 1,))


@dataclass
class _Written:
    count: int = 0
    first: int | None = None  # the epoch record in force, with --since
    second: int | None = None
    last: int | None = None


def _write_records(rows: Iterator[tuple[int, Any]], handle: IO[bytes]) -> _Written:
    written = _Written()
    batch: list[bytes] = []
    for seq, body in rows:
        line = (body.encode("utf-8") if isinstance(body, str) else bytes(body)).strip()
        if b"\n" in line or b"\r" in line:
            raise _ExportError(f"the stored record seq {seq} is not one line of JSON")
        batch.append(line)
        written.count += 1
        if written.first is None:
            written.first = seq
        elif written.second is None:
            written.second = seq
        written.last = seq
        if len(batch) >= 512:
            handle.write(b"\n".join(batch) + b"\n")
            batch.clear()
    if batch:
        handle.write(b"\n".join(batch) + b"\n")
    return written


def _describe(written: _Written, since: int | None) -> str:
    if not written.count:
        return "no records"
    if since is not None and written.first is not None and written.first < since:
        head = f"the epoch record in force (seq {written.first})"
        if written.second is None:
            return f"{head} only, no record from seq {since} on yet,"
        return f"{written.count} record(s): {head}, then seq {written.second}..{written.last},"
    return f"{written.count} record(s), seq {written.first}..{written.last},"


@contextmanager
def _replace_atomically(target: Path) -> Iterator[IO[bytes]]:
    """Write beside ``target`` and rename over it only when complete: an interrupted export leaves no half file."""
    directory = target.parent if str(target.parent) else Path()
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# -- keys generate ---------------------------------------------------------------------------------------------


def _add_keys_generate(keys_sub: Any) -> None:
    generate = keys_sub.add_parser(
        "generate",
        help="create an Ed25519 signing key pair and a pseudonym key (files 0600)",
        description=f"Writes {SIGNING_KEY_NAME}, {PUBLIC_KEY_NAME} and {PSEUDONYM_KEY_NAME} into DIR. Existing "
        "files are never overwritten. Give the public key to the platform; the other two never leave the gateway.",
    )
    generate.add_argument("--out", type=Path, required=True, metavar="DIR")
    generate.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    out: Path = args.out
    targets = [out / SIGNING_KEY_NAME, out / PUBLIC_KEY_NAME, out / PSEUDONYM_KEY_NAME]
    existing = [p for p in targets if p.exists()]
    if existing:
        names = ", ".join(str(p) for p in existing)
        print(f"error: refusing to overwrite existing key file(s): {names}", file=sys.stderr)
        return 1
    try:
        key = write_signing_key(targets[0], targets[1])
        write_pseudonym_key(targets[2])
    except OSError as exc:
        print(f"error: cannot write keys into {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"signing key   {targets[0]} (secret, 0600)")
    print(f"public key    {targets[1]} (give this to the platform; key id {key_id(key.public_key())})")
    print(f"pseudonym key {targets[2]} (secret, 0600, never leaves the gateway)")
    return 0
