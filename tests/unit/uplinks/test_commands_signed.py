"""Signed platform commands (``command_public_key_file``): one accepted, each refusal saying why, the worked
example in docs/commands.md checked byte for byte, and unauthenticated messages unable to use up an id."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.command_journal import JOURNAL_FILE, CommandJournal
from gateway.incentives.record import canonical, load_public_key, sign
from gateway.model import Command
from gateway.outbox import Outbox
from gateway.platform_commands import PlatformCommands

NOW_MS = 1_795_300_000_000
DOCS = Path(__file__).resolve().parents[3] / "docs" / "commands.md"
#: the test key of docs/commands.md (private seed 00 01 ... 1f)
DOC_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
DOC_COMMAND = {
    "v": 1,
    "id": "dr-2026-11-27-0042",
    "point": "ahu3.vent_setpoint_pct",
    "value": 40,
    "ts": 1795300000000,
    "expires": 1795300060000,
    "nonce": "q3Vx9LmT0pRk2WcA",
}
DOC_SIGNATURE = "SruHNd7gqt3uRY1j6a3K0zKC_VRUsEqv2IiHPMjZMIdy464UguBH3WBamPl1OeaTuKir9mS1vbpnVhiMXxPRBA"


class Recorder:
    def __init__(self) -> None:
        self.applied: list[Command] = []

    async def __call__(self, command: Command) -> None:
        self.applied.append(command)


@dataclass
class Signed:
    commands: PlatformCommands
    handler: Recorder
    outbox: Outbox

    def answers(self) -> list[dict[str, Any]]:
        return [{"id": s.event.id, **s.event.body} for s in self.outbox.read_events(0, limit=100)]


@pytest.fixture
async def signed(tmp_path: Path) -> AsyncIterator[Signed]:
    pem = DOC_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "platform.pub.pem").write_bytes(pem)
    outbox, handler = Outbox(tmp_path / "o.db"), Recorder()
    commands = PlatformCommands(
        handler,
        outbox,
        CommandJournal(tmp_path / JOURNAL_FILE),
        gateway_id="gw1",
        public_key=load_public_key(tmp_path / "platform.pub.pem"),
        time_ns=lambda: (NOW_MS + 350) * 10**6,
    )
    yield Signed(commands, handler, outbox)
    commands.close()
    await outbox.close()


def command(key: Ed25519PrivateKey = DOC_KEY, **changes: Any) -> bytes:
    body = {**DOC_COMMAND, **changes}
    body = {k: v for k, v in body.items() if v is not None}
    body["signature"] = sign(body, key)
    return orjson.dumps(body)


def test_the_worked_example_in_the_docs_is_what_the_gateway_signs_and_verifies() -> None:
    text = DOCS.read_text()
    signed_bytes = canonical(DOC_COMMAND)
    assert signed_bytes.decode() in text
    assert sign(DOC_COMMAND, DOC_KEY) == DOC_SIGNATURE and DOC_SIGNATURE in text
    # the docs' recipe (stdlib json, any language's equivalent) produces the same bytes
    assert json.dumps(DOC_COMMAND, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() == signed_bytes
    pem = DOC_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pem.decode().strip() in text


async def test_a_signed_command_is_applied_once(signed: Signed) -> None:
    published = orjson.dumps({**DOC_COMMAND, "signature": DOC_SIGNATURE})
    await signed.commands.handle("write", published)
    await signed.commands.handle("write", published)  # redelivered: the first answer, no second write
    assert [c.value for c in signed.handler.applied] == [40]
    (answer,) = signed.answers()
    assert answer["status"] == "applied" and answer["id"] == "cmd-result:dr-2026-11-27-0042"


OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def _unsigned() -> bytes:
    return orjson.dumps(DOC_COMMAND)


def _tampered() -> bytes:
    body = orjson.loads(command())
    body["value"] = 100  # the signature covered 40
    return orjson.dumps(body)


def _malformed() -> bytes:
    return orjson.dumps({**DOC_COMMAND, "signature": "c2lnbmF0dXJl"})


@pytest.mark.parametrize(
    ("payload", "status", "reason"),
    [
        (_unsigned(), "refused", "unsigned"),
        (_malformed(), "refused", "bad signature: not base64url of 64 bytes"),
        (command(OTHER_KEY), "refused", "bad signature: it does not verify"),
        (_tampered(), "refused", "bad signature: it does not verify"),
        (command(expires=NOW_MS - 1000), "refused", "expired"),
        (command(expires=NOW_MS + 3_600_000), "refused", "expires is more than 65s ahead"),
        (command(expires=None), "invalid", "needs expires"),
        (command(nonce="short"), "invalid", "needs a nonce"),
        (command(ts=NOW_MS - 120_000, expires=NOW_MS + 1000), "refused", "stale"),
    ],
)
async def test_each_refusal_says_why(signed: Signed, payload: bytes, status: str, reason: str) -> None:
    await signed.commands.handle("write", payload)
    (answer,) = signed.answers()
    assert answer["status"] == status and reason in answer["message"]
    assert signed.handler.applied == []


async def test_a_replayed_nonce_is_refused(signed: Signed) -> None:
    await signed.commands.handle("write", command())
    await signed.commands.handle("write", command(id="dr-2026-11-27-0043"))  # a new id, the old nonce
    first, replay = signed.answers()
    assert first["status"] == "applied"
    assert replay["status"] == "refused" and "replayed: this nonce was already used" in replay["message"]
    assert len(signed.handler.applied) == 1


async def test_an_unauthenticated_message_does_not_use_up_the_id_it_names(signed: Signed) -> None:
    await signed.commands.handle("write", command(OTHER_KEY, value=100))  # a forger guessing the next id
    await signed.commands.handle("write", command())  # the platform's own command under that id
    forged, authentic = signed.answers()
    assert forged["id"].startswith("cmd-result:dr-2026-11-27-0042:unverified-") and forged["status"] == "refused"
    assert authentic["id"] == "cmd-result:dr-2026-11-27-0042" and authentic["status"] == "applied"
    assert [c.value for c in signed.handler.applied] == [40]


def test_the_signature_is_base64url_without_padding() -> None:
    raw = base64.urlsafe_b64decode(DOC_SIGNATURE + "==")
    assert len(raw) == 64 and "=" not in DOC_SIGNATURE and len(DOC_SIGNATURE) == 86


def _site(tmp_path: Path, key_file: str) -> Path:
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\ngateway: {id: gw1, site: tower}\nhttp: {enabled: false}\n"
        f"uplinks:\n  platform: {{host: 127.0.0.1, command_public_key_file: {key_file}}}\n"
    )
    return site


async def test_the_key_file_is_configured_under_the_platform_uplink(tmp_path: Path) -> None:
    from gateway.config.site import load_site
    from gateway.errors import ConfigError
    from gateway.uplinks.runner import build_uplinks

    pem = DOC_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "platform.pub.pem").write_bytes(pem)
    site = load_site(_site(tmp_path, "platform.pub.pem"))  # relative to the site file
    outbox = Outbox(tmp_path / "data" / "outbox.db")
    try:
        (runner,) = build_uplinks(site, outbox, commands=Recorder())
        commands = runner.uplink.on_command.__self__  # type: ignore[attr-defined]
        assert isinstance(commands, PlatformCommands) and commands.public_key is not None
        assert (commands.max_age, commands.max_skew) == (60.0, 5.0)
        assert (tmp_path / "data" / JOURNAL_FILE).exists()
        await runner.uplink.close()
    finally:
        await outbox.close()
    with pytest.raises(ConfigError, match="command_public_key_file not found"):
        load_site(_site(tmp_path, "missing.pem"))
