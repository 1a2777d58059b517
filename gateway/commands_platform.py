"""Commands from the city platform (``{prefix}/{site}/{gateway}/cmd/<action>``): parsed, checked, applied through
the supervisor's command handler (the same allowlist as rules), answered with a durable result event.

Owns the command payload contract and its result. Imports no MQTT library: the MQTT uplink hands over the action
(the topic part after ``cmd/``) and the raw payload bytes.

Request (``cmd/write``)::

    {"v": 1, "id": "dr-2026-11-27-0042", "point": "ahu3.vent_setpoint_pct", "value": 40, "ts": 1795300000000}

``id`` is the platform's idempotency key: a command delivered twice (MQTT QoS 1 may) is applied once. ``ts``
(milliseconds, optional) lets a command that waited too long in some queue be refused as stale.

Result: an event of type ``command_result`` (so it sits in the outbox and is delivered even across an outage),
published on ``events/command_result`` with ``subject`` = the command id and body::

    {"command_id": "...", "action": "write", "point": "...", "value": 40,
     "status": "applied" | "refused" | "failed" | "invalid", "message": "why, for anything but applied"}
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from gateway.errors import DeviceError, WriteRejected
from gateway.model import Command, Event, is_point_id
from gateway.outbox import Outbox

log = logging.getLogger(__name__)

CommandHandler = Callable[[Command], Awaitable[None]]

_COMMAND_ID_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}\Z")
RESULT_EVENT_TYPE = "command_result"


class PlatformCommands:
    """Turns platform command messages into ``Command``s and answers each with a ``command_result`` event."""

    def __init__(
        self,
        handler: CommandHandler,
        outbox: Outbox,
        *,
        max_age: float,
        gateway_id: str,
        time_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.handler = handler
        self.outbox = outbox
        self.max_age = max_age
        self.gateway_id = gateway_id
        self.time_ns = time_ns
        self._in_progress: set[str] = set()
        self.received = 0
        self.duplicates = 0
        self.results: dict[str, int] = {}

    async def handle(self, action: str, payload: bytes) -> None:
        """Process one command message; never raises for bad input (the answer says what was wrong)."""
        self.received += 1
        try:
            raw = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            await self._answer(None, action, {}, "invalid", f"payload is not JSON: {exc}", payload)
            return
        if not isinstance(raw, dict):
            await self._answer(None, action, {}, "invalid", "payload must be a JSON object", payload)
            return
        command_id = raw.get("id")
        if not isinstance(command_id, str) or not _COMMAND_ID_RE.match(command_id):
            message = "id must be 1-128 characters of A-Z a-z 0-9 _ . : -"
            await self._answer(None, action, raw, "invalid", message, payload)
            return
        if command_id in self._in_progress or self.outbox.has_event(_result_id(command_id)):
            self.duplicates += 1
            log.info("platform command %s received again: already handled, not applied twice", command_id)
            return
        self._in_progress.add(command_id)
        try:
            status, reason = await self._apply(action, raw)
            await self._answer(command_id, action, raw, status, reason, payload)
        finally:
            self._in_progress.discard(command_id)

    async def _apply(self, action: str, raw: dict[str, Any]) -> tuple[str, str | None]:
        if action != "write":
            return "invalid", f"unknown command {action!r}: the gateway accepts cmd/write"
        unknown = set(raw) - {"v", "id", "point", "value", "ts"}
        if unknown:
            return "invalid", f"unknown keys: {', '.join(sorted(unknown))}"
        if raw.get("v", 1) != 1:
            return "invalid", f"unsupported command version {raw.get('v')!r} (this gateway speaks v1)"
        point, value, ts = raw.get("point"), raw.get("value"), raw.get("ts")
        if not isinstance(point, str) or not is_point_id(point):
            return "invalid", "point must be a point id (device.point)"
        if value is None or not isinstance(value, int | float | bool | str):
            return "invalid", "value must be a number, a boolean or a string"
        if ts is not None:
            if not isinstance(ts, int) or isinstance(ts, bool):
                return "invalid", "ts must be an integer (Unix milliseconds)"
            age = self.time_ns() / 1e9 - ts / 1000
            if age > self.max_age:
                return "refused", f"stale: the command is {age:.0f}s old (limit {self.max_age:g}s)"
        try:
            await self.handler(Command(point, value, "platform"))
        except WriteRejected as exc:
            return "refused", str(exc)
        except DeviceError as exc:
            return "failed", str(exc)
        return "applied", None

    async def _answer(  # noqa: PLR0917 (private, called from four places with the same shape)
        self, command_id: str | None, action: str, raw: dict[str, Any], status: str, message: str | None, payload: bytes
    ) -> None:
        self.results[status] = self.results.get(status, 0) + 1
        if status != "applied":
            log.warning("platform command %s (%s) %s: %s", command_id or "without id", action, status, message)
        else:
            log.info("platform command %s applied: %s = %r", command_id, raw.get("point"), raw.get("value"))
        # A command without a usable id still gets an answer, keyed by its payload's hash so a redelivery of the
        # same bad message is not answered twice.
        key = command_id or "invalid-" + hashlib.sha256(payload).hexdigest()[:16]
        body = {
            "command_id": command_id,
            "action": action,
            "point": raw.get("point") if isinstance(raw.get("point"), str) else None,
            "value": raw.get("value") if isinstance(raw.get("value"), int | float | bool | str) else None,
            "status": status,
            "message": message,
        }
        event = Event(_result_id(key), RESULT_EVENT_TYPE, key, self.time_ns(), body)
        await self.outbox.append_events([event])


def _result_id(command_id: str) -> str:
    return f"cmd-result:{command_id}"
