"""``edge-gateway incentives verify`` and ``edge-gateway keys generate``.

Owns argument parsing and output of the two commands; the checks live in ``verify``, the key files in ``record``.
Never imports the ledger (verifying needs only the records and a public key).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

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
    verify = inc_sub.add_parser(
        "verify",
        help="check signatures, hash chain, sequence gaps, duplicates and figures of a record stream",
        description="Verify incentive records (JSON Lines: records or event envelopes). Exit 0 when every check "
        "passes, 1 with one line per problem otherwise.",
    )
    verify.add_argument("records", type=Path, metavar="RECORDS.jsonl")
    verify.add_argument(
        "--public-key",
        type=Path,
        action="append",
        required=True,
        metavar="KEY",
        help="the gateway's Ed25519 public key (PEM); repeat for records signed before a key rotation",
    )
    verify.set_defaults(handler=_verify)

    keys = subparsers.add_parser("keys", help="incentive signing and pseudonym keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    generate = keys_sub.add_parser(
        "generate",
        help="create an Ed25519 signing key pair and a pseudonym key (files 0600)",
        description=f"Writes {SIGNING_KEY_NAME}, {PUBLIC_KEY_NAME} and {PSEUDONYM_KEY_NAME} into DIR. Existing "
        "files are never overwritten. Give the public key to the platform; the other two never leave the gateway.",
    )
    generate.add_argument("--out", type=Path, required=True, metavar="DIR")
    generate.set_defaults(handler=_generate)


def _verify(args: argparse.Namespace) -> int:
    from gateway.incentives.verify import verify_lines

    try:
        keys = [load_public_key(path) for path in args.public_key]
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        with args.records.open("rb") as handle:
            report = verify_lines(handle, keys)
    except OSError as exc:
        print(f"error: cannot read {args.records}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for problem in report.problems:
        print(problem)
    if report.problems:
        print(f"FAILED: {len(report.problems)} problem(s) in {report.records} record(s)", file=sys.stderr)
        return 1
    print(f"ok: {report.records} record(s), seq {report.first_seq}..{report.last_seq}, chain and signatures valid")
    return 0


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
