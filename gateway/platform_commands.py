"""Commands from the city platform (``{prefix}/{site}/{gateway}/cmd/<action>``): parsed strictly, checked, applied
through the supervisor's command handler (the same allowlist as rules) at most once, answered with a durable result.

Owns the command payload contract and its result. Imports no MQTT library: the MQTT uplink hands over the action
(the topic part after ``cmd/``) and the raw payload bytes.

Request (``cmd/write``)::

    {"v": 1, "id": "dr-2026-11-27-0042", "point": "ahu3.vent_setpoint_pct", "value": 40, "ts": 1795300000000}

or, instead of ``value``, ``"relinquish": true``: release the point's BACnet priority slot (write NULL at its
allowlist entry's priority); applied only when that entry has ``relinquish: true``, and refused by drivers without
priorities (Modbus, MQTT).

``id`` is the platform's idempotency key, journalled (``gateway.command_journal``) for 7 days: a repeat of the same
payload is answered with the original result event (same id, same bytes) and touches no device, even after the
outbox has compacted that result away or the gateway has restarted; a different payload under a used id is refused.
``ts`` (Unix milliseconds) is required: a command older than ``command_max_age`` or ahead of the gateway clock by
more than ``command_max_skew`` is refused. The payload is strict JSON: duplicate keys, NaN/Infinity and numbers
beyond what a double holds exactly (integers beyond ±2^53, floats that overflow) are refused as invalid.

Signed commands (``command_public_key_file`` set): the command also carries ``expires`` (Unix ms), ``nonce`` and
``signature`` = base64url (no padding) of the Ed25519 signature over the canonical JSON of the command without
``signature`` (keys sorted, no whitespace: ``gateway.incentives.record.canonical``). See docs/commands.md.

Result: an event of type ``command_result`` (so it sits in the outbox and is delivered even across an outage),
published on ``events/command_result`` with ``subject`` = the command id and body::

    {"command_id": "...", "action": "write", "point": "...", "value": 40,
     "status": "applied" | "refused" | "failed" | "invalid" | "unknown", "message": "why, for anything but applied"}

with ``"value": null, "relinquish": true`` for a relinquish (the key is absent for a write of a value).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.command_journal import CommandJournal, JournalEntry
from gateway.errors import DeviceError, WriteRejected
from gateway.incentives.record import canonical, signature_valid
from gateway.model import Command, Event, is_point_id
from gateway.outbox import Outbox

log = logging.getLogger(__name__)

CommandHandler = Callable[[Command], Awaitable[None]]

_COMMAND_ID_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}\Z")
_NONCE_RE = re.compile(r"[A-Za-z0-9_\-]{16,128}\Z")
RESULT_EVENT_TYPE = "command_result"
#: the largest integer every JSON implementation (IEEE double) holds exactly
MAX_SAFE_INTEGER = 2**53
_BASE_KEYS = frozenset({"v", "id", "point", "value", "relinquish", "ts"})
_SIGNED_KEYS = frozenset({"expires", "nonce", "signature"})

#: a long-running gateway forgets expired journal entries this often (and at every start)
PRUNE_EVERY_S = 3600.0
DEFAULT_MAX_AGE = 60.0
DEFAULT_MAX_SKEW = 5.0


class StrictJsonError(ValueError):
    """The payload is JSON a careful parser must not act on (duplicate keys, NaN, out-of-range numbers)."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise StrictJsonError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _constant(name: str) -> Any:
    raise StrictJsonError(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJsonError(f"number {text[:32]} is out of range")
    return value


def _int(text: str) -> int:
    if len(text) > 20:
        raise StrictJsonError(f"number {text[:32]}... is out of range")
    value = int(text)
    if abs(value) > MAX_SAFE_INTEGER:
        raise StrictJsonError(f"integer {value} is out of range (beyond ±2^53)")
    return value


def strict_loads(payload: bytes) -> Any:
    """Parse JSON refusing what orjson and the standard library would quietly accept: duplicate keys (the last one
    would win), NaN and Infinity, integers beyond ±2^53 and floats that overflow to infinity. Raises
    ``StrictJsonError`` for those and ``ValueError`` for anything that is not JSON (or not UTF-8)."""
    text = payload.decode("utf-8")
    return json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float, parse_int=_int)


def payload_hash(raw: dict[str, Any] | None, payload: bytes) -> str:
    """SHA-256 of the canonical form (keys sorted, no whitespace) when the payload parsed, else of its bytes: a
    platform that re-serialises the same command (other key order) sends the same command."""
    data = canonical(raw, with_signature=True) if raw is not None else payload
    return hashlib.sha256(data).hexdigest()


class PlatformCommands:
    """Turns platform command messages into ``Command``s and answers each with a ``command_result`` event."""

    def __init__(
        self,
        handler: CommandHandler,
        outbox: Outbox,
        journal: CommandJournal,
        *,
        gateway_id: str,
        max_age: float = DEFAULT_MAX_AGE,
        max_skew: float = DEFAULT_MAX_SKEW,
        public_key: Ed25519PublicKey | None = None,
        time_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if max_age * 1e9 + max_skew * 1e9 >= journal.retention_ns:
            raise ValueError("the command journal must keep entries longer than a command's max age and skew")
        self.handler = handler
        self.outbox = outbox
        self.journal = journal
        self.max_age = max_age
        self.max_skew = max_skew
        self.public_key = public_key
        self.gateway_id = gateway_id
        self.time_ns = time_ns
        self._recovered = False
        self._pruned_at = 0.0
        self._lock = asyncio.Lock()
        self.received = 0
        self.duplicates = 0
        self.results: dict[str, int] = {}

    # -- start-up -----------------------------------------------------------------------------------------------

    async def recover(self) -> None:
        """Answer what a crash left unanswered (see ``gateway.command_journal``): a stored result goes to the outbox
        again; a command received but never settled is answered ``unknown`` and never re-applied. Idempotent."""
        async with self._lock:
            if self._recovered:
                return
            for entry in await asyncio.to_thread(self.journal.unanswered):
                result = entry.result if entry.result is not None else await self._settle_unknown(entry)
                await self._send(entry.command_id, result)
            await self._prune()
            self._recovered = True

    async def _settle_unknown(self, entry: JournalEntry) -> dict[str, Any]:
        """The answer for a command taken on whose outcome was never recorded (a crash, or an unexpected error)."""
        log.error(
            "platform command %s was being applied when the gateway stopped or failed: outcome unknown, "
            "not applied again",
            entry.command_id,
        )
        message = (
            "the gateway stopped while applying this command: whether the device took it is unknown; "
            "it is not applied again (read the point to see its value)"
        )
        result = self._result(entry.command_id, entry.command_id, "write", {}, "unknown", message)
        await asyncio.to_thread(self.journal.settle, entry.command_id, result)
        self._count("unknown")
        stored = await asyncio.to_thread(self.journal.get, entry.command_id)
        assert stored is not None and stored.result is not None
        return stored.result  # the one settled first, should another have won

    async def _prune(self) -> None:
        await asyncio.to_thread(self.journal.prune, self.time_ns())
        self._pruned_at = time.monotonic()

    def close(self) -> None:
        self.journal.close()

    # -- one command --------------------------------------------------------------------------------------------

    async def handle(self, action: str, payload: bytes) -> None:
        """Process one command message; never raises for bad input (the answer says what was wrong)."""
        await self.recover()
        async with self._lock:
            await self._handle(action, payload)

    async def _handle(self, action: str, payload: bytes) -> None:
        self.received += 1
        if time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
            await self._prune()
        raw: dict[str, Any] | None = None
        problem: str | None = None
        try:
            parsed = strict_loads(payload)
        except StrictJsonError as exc:
            problem = f"payload refused: {exc}"
            parsed = _lenient(payload)  # only to find the id the answer belongs to
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
            problem = f"payload is not JSON: {exc}"
            parsed = None
        if isinstance(parsed, dict):
            raw = parsed
        elif problem is None:
            problem = "payload must be a JSON object"
        command_id = raw.get("id") if raw is not None else None
        if not isinstance(command_id, str) or not _COMMAND_ID_RE.match(command_id) or command_id.startswith("invalid-"):
            command_id = None
            problem = problem or "id must be 1-128 characters of A-Z a-z 0-9 _ . : - (not starting with invalid-)"
        # without a usable id the answer is keyed by the payload's hash: the same bad message is answered once
        key = command_id or "invalid-" + hashlib.sha256(payload).hexdigest()[:16]
        digest = payload_hash(raw if problem is None else None, payload)

        entry = await asyncio.to_thread(self.journal.get, key)
        if entry is not None:
            await self._repeat(entry, key, action, raw, digest)
            return

        if self.public_key is not None:
            unverified = problem or self._unverified(raw)
            if unverified is not None:
                # Nothing unauthenticated is journalled under an id: a forged message must not use up the id of a
                # command the platform has yet to send. Its answer has a result id of its own.
                answer = "invalid" if problem is not None else "refused"
                await self._answer_unverified(key, command_id, action, raw or {}, payload, answer, unverified)
                return
        if problem is not None:
            await self._settle_new(key, command_id, action, raw or {}, digest, "invalid", problem, None)
            return
        assert raw is not None and command_id is not None
        refusal, reason, nonce = self._check(action, raw)
        if refusal is not None:
            await self._settle_new(key, command_id, action, raw, digest, refusal, reason, None)
            return
        # durable before the device is written: a crash from here on is answered "unknown", never re-applied
        await asyncio.to_thread(self.journal.receive, key, digest, self.time_ns(), nonce)
        status, reason = await self._apply(raw)
        result = self._result(key, command_id, action, raw, status, reason)
        await asyncio.to_thread(self.journal.settle, key, result)
        self._log(command_id, action, raw, status, reason)
        await self._send(key, result)

    async def _repeat(
        self, entry: JournalEntry, key: str, action: str, raw: dict[str, Any] | None, digest: str
    ) -> None:
        if entry.payload_hash == digest or key.startswith("invalid-"):
            self.duplicates += 1
            log.info("platform command %s received again: answered with its first result, not applied again", key)
            # no result: an earlier attempt died with an unexpected error after taking the command on
            result = entry.result if entry.result is not None else await self._settle_unknown(entry)
            await self._send(key, result)
            return
        # The same id with another payload: a platform bug or a replay. Answered under its own result id, so the
        # original result (which the platform may deduplicate on) is left alone.
        message = f"command id {key!r} was already used for a different command: ids are single-use; not applied"
        self._count("refused")
        log.warning("platform command %s refused: %s", key, message)
        result = self._result(key, key, action, raw or {}, "refused", message)
        result["id"] = f"{_result_id(key)}:conflict-{digest[:16]}"
        await self._append(result)

    def _check(self, action: str, raw: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
        """(status, reason, nonce): status None when the command may be applied."""
        if action != "write":
            return "invalid", f"unknown command {action!r}: the gateway accepts cmd/write", None
        unknown = set(raw) - _BASE_KEYS - _SIGNED_KEYS
        if unknown:
            return "invalid", f"unknown keys: {', '.join(sorted(unknown))}", None
        if raw.get("v", 1) != 1:
            return "invalid", f"unsupported command version {raw.get('v')!r} (this gateway speaks v1)", None
        point, value = raw.get("point"), raw.get("value")
        if not isinstance(point, str) or not is_point_id(point):
            return "invalid", "point must be a point id (device.point)", None
        relinquish = "relinquish" in raw
        if relinquish and raw["relinquish"] is not True:
            # one spelling per intent: a write carries a value, a relinquish carries "relinquish": true
            return "invalid", "relinquish, when given, must be true (leave it out to write a value)", None
        if relinquish and "value" in raw:
            return "invalid", 'a command has a value or "relinquish": true, not both', None
        if not relinquish and (value is None or not isinstance(value, int | float | bool | str)):
            return "invalid", 'value must be a number, a boolean or a string (or "relinquish": true)', None
        now_ms = self.time_ns() / 1e6
        ts = raw.get("ts")
        if ts is None:
            return "invalid", "ts (Unix milliseconds) is required", None
        if not _is_int(ts):
            return "invalid", "ts must be an integer (Unix milliseconds)", None
        age = (now_ms - ts) / 1000
        if age > self.max_age:
            return "refused", f"stale: the command is {age:.0f}s old (limit {self.max_age:g}s)", None
        if -age > self.max_skew:
            return "refused", f"ts is {-age:.0f}s ahead of the gateway clock (limit {self.max_skew:g}s)", None
        if self.public_key is None:
            return None, None, None
        return self._check_signed(raw, now_ms)

    def _unverified(self, raw: dict[str, Any] | None) -> str | None:
        """Why a command is not known to come from the platform, or None when its signature verifies."""
        assert self.public_key is not None and raw is not None
        signature = raw.get("signature")
        if signature is None:
            return "unsigned: this gateway accepts only signed commands"
        if not isinstance(signature, str) or not _signature_decodes(signature):
            return "bad signature: not base64url of 64 bytes"
        if not signature_valid(raw, self.public_key):
            return "bad signature: it does not verify with the platform key"
        return None

    def _check_signed(self, raw: dict[str, Any], now_ms: float) -> tuple[str | None, str | None, str | None]:
        """expires and nonce of a command whose signature verified."""
        expires, nonce = raw.get("expires"), raw.get("nonce")
        if not isinstance(expires, int) or isinstance(expires, bool):
            return "invalid", "a signed command needs expires (integer Unix milliseconds)", None
        if not isinstance(nonce, str) or not _NONCE_RE.match(nonce):
            return "invalid", "a signed command needs a nonce of 16-128 characters of A-Z a-z 0-9 _ -", None
        if expires < now_ms:
            return "refused", f"expired: {(now_ms - expires) / 1000:.0f}s ago", None
        if expires - now_ms > (self.max_age + self.max_skew) * 1000:
            # a longer-lived command could outlive the journal's memory of its nonce
            return "refused", f"expires is more than {self.max_age + self.max_skew:g}s ahead", None
        if self.journal.nonce_seen(nonce):
            return "refused", "replayed: this nonce was already used", None
        return None, None, nonce

    async def _apply(self, raw: dict[str, Any]) -> tuple[str, str | None]:
        try:
            if raw.get("relinquish") is True:
                # the slot released is the allowlist entry's; the platform cannot name another
                await self.handler(Command(raw["point"], None, "platform", relinquish=True))
            else:
                await self.handler(Command(raw["point"], raw["value"], "platform"))
        except WriteRejected as exc:
            return "refused", str(exc)
        except DeviceError as exc:
            return "failed", str(exc)
        except Exception as exc:  # a bug below us: whether the device was written is not known
            log.exception("platform command %s: unexpected error while applying it", raw.get("id"))
            return "unknown", f"unexpected error while applying the command ({type(exc).__name__}); not retried"
        return "applied", None

    # -- answers ------------------------------------------------------------------------------------------------

    async def _settle_new(  # noqa: PLR0917 (private; one shape for every refusal)
        self,
        key: str,
        command_id: str | None,
        action: str,
        raw: dict[str, Any],
        digest: str,
        status: str,
        reason: str | None,
        nonce: str | None,
    ) -> None:
        """A command answered without touching a device: journalled with its result in one go, then sent."""
        result = self._result(key, command_id, action, raw, status, reason)
        await asyncio.to_thread(self.journal.receive, key, digest, self.time_ns(), nonce, result)
        self._log(command_id, action, raw, status, reason)
        await self._send(key, result)

    def _result(  # noqa: PLR0917 (private)
        self, key: str, command_id: str | None, action: str, raw: dict[str, Any], status: str, message: str | None
    ) -> dict[str, Any]:
        point, value = raw.get("point"), raw.get("value")
        body = {
            "command_id": command_id,
            "action": action,
            "point": point if isinstance(point, str) else None,
            "value": value if isinstance(value, int | float | bool | str) else None,
            "status": status,
            "message": message,
        }
        if raw.get("relinquish") is True:
            body["relinquish"] = True
        return {"id": _result_id(key), "subject": key, "ts": self.time_ns(), "body": body}

    async def _answer_unverified(  # noqa: PLR0917 (private)
        self,
        key: str,
        command_id: str | None,
        action: str,
        raw: dict[str, Any],
        payload: bytes,
        status: str,
        reason: str,
    ) -> None:
        result = self._result(key, command_id, action, raw, status, reason)
        result["id"] = f"{_result_id(key)}:unverified-{hashlib.sha256(payload).hexdigest()[:16]}"
        self._log(command_id, action, raw, status, reason)
        await self._append(result)

    def _count(self, status: str) -> None:
        self.results[status] = self.results.get(status, 0) + 1

    def _log(self, command_id: str | None, action: str, raw: dict[str, Any], status: str, message: str | None) -> None:
        self._count(status)
        if status != "applied":
            log.warning("platform command %s (%s) %s: %s", command_id or "without id", action, status, message)
        else:
            what = "relinquished" if raw.get("relinquish") is True else f"= {raw.get('value')!r}"
            log.info("platform command %s applied: %s %s", command_id, raw.get("point"), what)

    async def _send(self, key: str, result: dict[str, Any]) -> None:
        await self._append(result)
        await asyncio.to_thread(self.journal.mark_answered, key)

    async def _append(self, result: dict[str, Any]) -> None:
        event = Event(result["id"], RESULT_EVENT_TYPE, result["subject"], result["ts"], result["body"])
        await self.outbox.append_events([event])


def _result_id(command_id: str) -> str:
    return f"cmd-result:{command_id}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _lenient(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


def _signature_decodes(text: str) -> bool:
    try:
        return len(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))) == 64
    except (binascii.Error, ValueError):
        return False
