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
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SCHEMA_ID = "edge-gateway/incentive-record/1"
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
