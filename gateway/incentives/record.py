"""The signed incentive record: canonical encoding, Ed25519 signing, hash chain, keyed pseudonyms, key files.

Owns everything the gateway and a verifier must agree on byte for byte. Imports only ``cryptography`` and
``orjson``; never the stage or SQLite (the ``verify`` command uses this module alone).

Canonical encoding
    UTF-8 JSON of the record with the ``signature`` member removed, object keys sorted, no whitespace (orjson with
    ``OPT_SORT_KEYS``). Records hold only strings, integers, booleans, null, arrays and objects, never floats (every
    figure is a decimal string), so the encoding is also the RFC 8785 (JCS) form and any language reproduces it.
    ``signature`` = base64url (no padding) of the Ed25519 signature over those bytes.
    ``hash`` of a record = SHA-256 hex of the canonical encoding of the *whole* record, signature included; the next
    record carries it as ``prev_hash`` (the first one carries 64 zeros).

Chain-head checkpoint (``make_checkpoint``, ``checkpoint_problems``)
    ``{"schema": CHECKPOINT_SCHEMA_ID, "gateway", "site", "epoch", "seq", "hash", "ts", "key_id", "signature"}``,
    signed like a record; ``hash`` is the ``record_hash`` of record ``seq``. The rules are in docs/incentives.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SCHEMA_ID = "edge-gateway/incentive-record/2"
CHECKPOINT_SCHEMA_ID = "edge-gateway/incentive-checkpoint/1"
GENESIS_HASH = "0" * 64
SIGNING_KEY_NAME = "incentive-signing.pem"
PUBLIC_KEY_NAME = "incentive-signing.pub.pem"
PSEUDONYM_KEY_NAME = "incentive-pseudonym.key"
#: a pseudonym key shorter than this (128 bits of hex) is refused
MIN_PSEUDONYM_KEY_CHARS = 32


class KeyFileError(ValueError):
    """A key file is missing, unreadable or not the kind of key expected."""


def canonical(record: dict[str, Any], *, with_signature: bool = False) -> bytes:
    body = record if with_signature else {k: v for k, v in record.items() if k != "signature"}
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(record, with_signature=True)).hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 of the raw public key: names the key in each record."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(record: dict[str, Any], private_key: Ed25519PrivateKey) -> str:
    signature = private_key.sign(canonical(record))
    return base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")


def signature_valid(record: dict[str, Any], public_key: Ed25519PublicKey) -> bool:
    text = record.get("signature")
    if not isinstance(text, str):
        return False
    try:
        signature = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        public_key.verify(signature, canonical(record))
    except (InvalidSignature, ValueError):
        return False
    return True


class Pseudonymizer:
    """Keyed hashes (HMAC-SHA256) of real ids. The key stays on the gateway; without it the platform cannot turn
    a pseudonym back into an account or a meter into an apartment."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_PSEUDONYM_KEY_CHARS:
            raise KeyFileError(f"the pseudonym key must be at least {MIN_PSEUDONYM_KEY_CHARS} characters")
        self._key = key

    def _digest(self, kind: str, value: str) -> str:
        return hmac.new(self._key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()

    def account(self, account_id: str) -> str:
        return "acct_" + self._digest("account", account_id)[:32]

    def meter(self, point: str) -> str:
        return "meter_" + self._digest("meter", point)[:16]

    @property
    def fingerprint(self) -> str:
        """Names the key (not secret) so the ledger can refuse a silently changed key."""
        return hashlib.sha256(b"pseudonym-key-fingerprint:" + self._key).hexdigest()[:16]


def record_id(gateway: str, account_pseudonym: str, start_ns: int) -> str:
    """Deterministic: the same account and interval always get the same id, before or after a crash."""
    digest = hashlib.sha256(f"{gateway}/{account_pseudonym}/{start_ns}".encode()).hexdigest()
    return "inc_" + digest[:32]


def settlement_id(gateway: str, account_pseudonym: str, day: str) -> str:
    """``day`` is the account's local date, ``YYYY-MM-DD``: one settlement per account and day, whatever resends."""
    digest = hashlib.sha256(f"{gateway}/{account_pseudonym}/day/{day}".encode()).hexdigest()
    return "set_" + digest[:32]


def epoch_id(gateway: str, epoch: int) -> str:
    digest = hashlib.sha256(f"{gateway}/epoch/{epoch}".encode()).hexdigest()
    return "epo_" + digest[:32]


def programme_hash(programme_body: dict[str, Any]) -> str:
    """SHA-256 hex of the canonical encoding of a programme body (every member, nothing removed)."""
    return hashlib.sha256(orjson.dumps(programme_body, option=orjson.OPT_SORT_KEYS)).hexdigest()


_SIGNATURE_TEXT = re.compile(r"[A-Za-z0-9_-]{86}")


def signature_is_canonical(text: Any) -> bool:
    """True when ``text`` is the one unpadded base64url spelling of 64 bytes.

    A lenient decoder ignores the 4 unused bits of the last character, so 16 spellings decode to the same
    signature; only one of them is what ``sign`` writes, and a record's hash (over the text) must not be malleable.
    """
    if not isinstance(text, str) or _SIGNATURE_TEXT.fullmatch(text) is None:
        return False
    try:
        raw = base64.urlsafe_b64decode(text + "==")
    except (binascii.Error, ValueError):
        return False
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") == text


# -- chain-head checkpoint --------------------------------------------------------------------------------------

_CHECKPOINT_MEMBERS: dict[str, type] = {
    "schema": str,
    "gateway": str,
    "site": str,
    "epoch": int,
    "seq": int,
    "hash": str,
    "ts": str,
    "key_id": str,
    "signature": str,
}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHECKPOINT_TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


def format_checkpoint_ts(ts_ns: int) -> str:
    """UTC, whole seconds (truncated), ``2026-12-02T10:15:07Z``."""
    return datetime.fromtimestamp(ts_ns // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_checkpoint(
    *,
    gateway: str,
    site: str,
    epoch: int,
    seq: int,
    head_hash: str,
    ts_ns: int,
    private_key: Ed25519PrivateKey,
) -> dict[str, Any]:
    """The signed chain-head checkpoint for record ``seq`` whose ``record_hash`` is ``head_hash``."""
    checkpoint: dict[str, Any] = {
        "schema": CHECKPOINT_SCHEMA_ID,
        "gateway": gateway,
        "site": site,
        "epoch": epoch,
        "seq": seq,
        "hash": head_hash,
        "ts": format_checkpoint_ts(ts_ns),
        "key_id": key_id(private_key.public_key()),
    }
    checkpoint["signature"] = sign(checkpoint, private_key)
    return checkpoint


def checkpoint_problems(checkpoint: Any, public_keys: Iterable[Ed25519PublicKey]) -> list[str]:
    """What is wrong with a checkpoint on its own (shape, key, signature); empty when it is sound.

    Whether the stream holds ``seq`` with that ``hash`` is the verifier's question, not this one's.
    """
    if not isinstance(checkpoint, dict):
        return ["the checkpoint is not a JSON object"]
    problems: list[str] = []
    for name, kind in _CHECKPOINT_MEMBERS.items():
        if name not in checkpoint:
            problems.append(f"the checkpoint has no member {name!r}")
        elif not isinstance(checkpoint[name], kind) or (kind is int and isinstance(checkpoint[name], bool)):
            problems.append(f"the checkpoint member {name!r} has the wrong type")
    problems.extend(
        f"the checkpoint has an unexpected member {name!r}" for name in checkpoint if name not in _CHECKPOINT_MEMBERS
    )
    if problems:
        return problems
    if checkpoint["schema"] != CHECKPOINT_SCHEMA_ID:
        problems.append(
            f"unknown checkpoint schema {checkpoint['schema']!r} (this verifier knows {CHECKPOINT_SCHEMA_ID})"
        )
    if checkpoint["seq"] < 1 or checkpoint["epoch"] < 1:
        problems.append("the checkpoint's seq and epoch must be 1 or more")
    if _HEX64.fullmatch(checkpoint["hash"]) is None:
        problems.append("the checkpoint's hash is not 64 lowercase hex digits")
    if _CHECKPOINT_TS.fullmatch(checkpoint["ts"]) is None:
        problems.append("the checkpoint's ts is not a UTC time like 2026-12-02T10:15:07Z")
    keys = {key_id(k): k for k in public_keys}
    key = keys.get(checkpoint["key_id"])
    if key is None:
        given = ", ".join(sorted(keys)) or "none"
        problems.append(f"the checkpoint is signed by key {checkpoint['key_id']}, not by the given key ({given})")
    elif not signature_is_canonical(checkpoint["signature"]) or not signature_valid(checkpoint, key):
        problems.append("bad checkpoint signature: the checkpoint was changed after it was signed")
    return problems


# -- key files ------------------------------------------------------------------------------------------------------


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from gateway.files import check_private_file

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    try:
        # anyone who can read it can sign records the platform pays on: refused like ssh refuses a private key
        check_private_file(path, "signing key")
    except OSError as exc:
        raise KeyFileError(str(exc)) from None
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def load_pseudonym_key(path: Path) -> bytes:
    """First line of the file, stripped (the same convention as every ``*_file`` secret): at least 64 hex digits
    (32 random bytes, what ``keys generate`` writes), in a file only its owner can read.

    A guessable key turns every pseudonym back into an account id by brute force over the (few) real ids, so a
    short or patterned key is refused rather than used. "Patterned": fewer than 10 different hex digits (64 random
    digits show fewer than 10 about once in 10**12 keys; requiring all 16 would refuse a quarter of random keys) or
    one block repeated. The key text itself (not the decoded bytes) stays the HMAC key, as before."""
    from gateway.files import check_private_file

    min_hex_digits = 64
    min_distinct_digits = 10
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read pseudonym key {path}: {exc}") from exc
    lines = text.splitlines()
    key = lines[0].strip() if lines else ""
    fix = "create one with `edge-gateway keys generate`"
    if not key or any(c not in "0123456789abcdefABCDEF" for c in key):
        raise KeyFileError(f"{path}: the pseudonym key must be hex digits (64 or more); {fix}")
    if len(key) < min_hex_digits:
        raise KeyFileError(
            f"{path}: the pseudonym key has {len(key)} hex digits, at least {min_hex_digits} (32 random bytes) are "
            f"needed; {fix}"
        )
    digits = key.lower()
    distinct = len(set(digits))
    repeated = any(digits[n:] == digits[:-n] for n in range(1, len(digits) // 2 + 1))  # period n: s[n:] == s[:-n]
    if distinct < min_distinct_digits or repeated:
        why = f"only {distinct} different digits" if distinct < min_distinct_digits else "one block repeated"
        raise KeyFileError(f"{path}: the pseudonym key does not look random ({why}); {fix}")
    try:
        check_private_file(path, "pseudonym key")
    except OSError as exc:
        raise KeyFileError(str(exc)) from None
    return key.encode("utf-8")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never world-readable, even for an instant); refuse to overwrite.
    A directory created for it is 0700."""
    from gateway.files import ensure_private_dir

    ensure_private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it; make it exactly what we promise


def write_signing_key(private_path: Path, public_path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o600)
    return key


def write_pseudonym_key(path: Path) -> None:
    _write_new(path, (secrets.token_hex(32) + "\n").encode("ascii"), 0o600)


def public_key_path_for(private_path: Path) -> Path:
    """``keys/incentive-signing.pem`` -> ``keys/incentive-signing.pub.pem``."""
    name = private_path.name
    stem = name[: -len(".pem")] if name.endswith(".pem") else name
    return private_path.with_name(stem + ".pub.pem")
