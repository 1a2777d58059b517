"""``edge-gateway incentives verify`` and ``edge-gateway keys generate``.

Owns argument parsing and output of these commands; the checks live in ``verify``, the key files and checkpoints in
``record``. ``verify`` never opens the ledger (it needs only the records and a public key).

Each sub-command is added by its own ``_add_*`` function, so other ``incentives`` sub-commands can join
``register`` without touching these.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

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


def register(subparsers: Any) -> None:
    incentives = subparsers.add_parser("incentives", help="low-carbon incentive records")
    inc_sub = incentives.add_subparsers(dest="incentives_command", metavar="COMMAND", required=True)
    _add_verify(inc_sub)

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
