"""Key files: a secret others can read, a short pseudonym key or an obviously non-random one is refused with one
line saying what to do; what ``keys generate`` writes is accepted."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.errors import ConfigError
from gateway.incentives.record import (
    KeyFileError,
    load_private_key,
    load_pseudonym_key,
    write_pseudonym_key,
    write_signing_key,
)
from tests.unit.incentives.helpers import make_site


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize(
    ("mode", "who"), [(0o644, "readable by others (mode 0644)"), (0o640, "readable by its group (mode 0640)")]
)
def test_a_signing_key_others_can_read_is_refused_like_ssh(tmp_path: Path, mode: int, who: str) -> None:
    private = tmp_path / "signing.pem"
    write_signing_key(private, tmp_path / "signing.pub.pem")
    load_private_key(private)  # as written: 0600, accepted
    os.chmod(private, mode)
    with pytest.raises(KeyFileError) as info:
        load_private_key(private)
    assert str(info.value) == f"signing key {private} is {who}: chmod 600 {private}"


def test_a_pseudonym_key_others_can_read_is_refused(tmp_path: Path) -> None:
    path = _key_file(tmp_path / "p.key", secrets.token_hex(32), 0o644)
    with pytest.raises(KeyFileError, match=r"pseudonym key .* is readable by others \(mode 0644\): chmod 600 "):
        load_pseudonym_key(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a" * 32, "the pseudonym key has 32 hex digits, at least 64 (32 random bytes) are needed"),  # the audit's
        ("a" * 64, "the pseudonym key does not look random (only 1 different digits)"),
        ("0f" * 40, "the pseudonym key does not look random (only 2 different digits)"),
        ("0123456789abcdef" * 4, "the pseudonym key does not look random (one block repeated)"),
        (secrets.token_hex(31), "the pseudonym key has 62 hex digits"),
        ("k" * 64, "the pseudonym key must be hex digits (64 or more)"),
        ("", "the pseudonym key must be hex digits (64 or more)"),
    ],
)
def test_a_short_or_patterned_pseudonym_key_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = _key_file(tmp_path / "p.key", text)
    with pytest.raises(KeyFileError) as info:
        load_pseudonym_key(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert str(info.value).endswith("create one with `edge-gateway keys generate`")


def test_random_keys_are_accepted_whatever_their_case(tmp_path: Path) -> None:
    path = tmp_path / "p.key"
    for _ in range(2000):  # the distinct-digit floor must never refuse what `keys generate` writes
        text = secrets.token_hex(32)
        _key_file(path, text)
        assert load_pseudonym_key(path) == text.encode()
    upper = secrets.token_hex(40).upper()
    _key_file(path, upper)
    assert load_pseudonym_key(path) == upper.encode()


def test_write_pseudonym_key_and_keys_generate_write_64_hex_digits_in_a_private_directory(tmp_path: Path) -> None:
    write_pseudonym_key(tmp_path / "fresh" / "p.key")
    assert len(load_pseudonym_key(tmp_path / "fresh" / "p.key")) == 64
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700
    assert main(["keys", "generate", "--out", str(tmp_path / "keys")]) == 0
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    key = load_pseudonym_key(tmp_path / "keys" / "incentive-pseudonym.key")
    assert len(key) == 64


def test_the_stage_refuses_an_exposed_signing_key_at_the_key_files_line(tmp_path: Path) -> None:
    from gateway.incentives.stage import IncentiveStage

    keys = tmp_path / "data" / "keys"
    write_signing_key(keys / "signing.pem", keys / "signing.pub.pem")
    write_pseudonym_key(keys / "pseudonym.key")
    os.chmod(keys / "signing.pem", 0o644)
    with pytest.raises(ConfigError) as info:
        IncentiveStage.open(make_site(tmp_path), tmp_path / "data")
    text = str(info.value)
    assert f"is readable by others (mode 0644): chmod 600 {keys / 'signing.pem'}" in text
    assert len(info.value.diagnostics) == 1
