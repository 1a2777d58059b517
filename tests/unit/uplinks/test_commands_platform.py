"""Platform commands: applied through the handler once, refused or failed with a reason, invalid ones answered."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from gateway.commands_platform import PlatformCommands
from gateway.errors import DeviceUnavailable, WriteRejected
from gateway.model import Command
from gateway.outbox import Outbox

NOW_NS = 1_795_000_000 * 10**9


class Handler:
    def __init__(self) -> None:
        self.applied: list[Command] = []

    async def __call__(self, command: Command) -> None:
        if command.point == "ahu3.locked":
            raise WriteRejected("ahu3.locked: not in the allow list")
        if command.point == "ahu3.offline":
            raise DeviceUnavailable("ahu3: no answer after 3 retries")
        if isinstance(command.value, int | float) and not 20 <= command.value <= 100:
            raise WriteRejected(f"{command.point}: {command.value} outside 20..100")
        self.applied.append(command)


@pytest.fixture
async def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    outbox = Outbox(tmp_path / "o.db")
    handler = Handler()
    commands = PlatformCommands(handler, outbox, max_age=300, gateway_id="gw1", time_ns=lambda: NOW_NS)
    yield commands, handler, outbox
    await outbox.close()


def results(outbox: Outbox) -> dict[str, dict[str, object]]:
    return {s.event.subject: s.event.body for s in outbox.read_events(0, limit=100)}


def cmd(**fields: object) -> bytes:
    return orjson.dumps({"v": 1, **fields})


@pytest.mark.parametrize(
    ("action", "payload", "status", "reason"),
    [
        ("write", cmd(id="c1", point="ahu3.setpoint", value=40), "applied", None),
        ("write", cmd(id="c2", point="ahu3.setpoint", value=140), "refused", "outside 20..100"),
        ("write", cmd(id="c3", point="ahu3.locked", value=40), "refused", "not in the allow list"),
        ("write", cmd(id="c4", point="ahu3.offline", value=40), "failed", "no answer"),
        ("write", cmd(id="c5", point="AHU3", value=40), "invalid", "point id"),
        ("write", cmd(id="c6", point="ahu3.setpoint"), "invalid", "value must be"),
        ("write", cmd(id="c7", point="ahu3.setpoint", value=40, extra=1), "invalid", "unknown keys: extra"),
        ("write", cmd(id="c8", point="ahu3.setpoint", value=40, ts=NOW_NS // 10**6 - 3_600_000), "refused", "stale"),
        ("write", orjson.dumps({"v": 2, "id": "c9", "point": "ahu3.setpoint", "value": 40}), "invalid", "version"),
        ("reboot", cmd(id="c10"), "invalid", "unknown command 'reboot'"),
    ],
)  # fmt: skip
async def test_each_command_gets_one_answer_saying_why(setup, action, payload, status, reason) -> None:  # type: ignore[no-untyped-def]
    commands, handler, outbox = setup
    await commands.handle(action, payload)
    ((_subject, body),) = results(outbox).items()
    assert body["status"] == status
    assert (body["message"] is None) if reason is None else (reason in str(body["message"]))
    assert len(handler.applied) == (1 if status == "applied" else 0)


async def test_a_redelivered_command_is_applied_once_even_after_a_restart(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    commands, handler, outbox = setup
    payload = cmd(id="dr-42", point="ahu3.setpoint", value=60)
    await commands.handle("write", payload)
    await commands.handle("write", payload)
    restarted = PlatformCommands(handler, outbox, max_age=300, gateway_id="gw1", time_ns=lambda: NOW_NS)
    await restarted.handle("write", payload)
    assert [c.value for c in handler.applied] == [60]
    assert commands.duplicates == 1 and restarted.duplicates == 1
    assert handler.applied[0].origin == "platform"


@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]", cmd(point="ahu3.setpoint", value=1), cmd(id="a b")])
async def test_payloads_without_a_usable_id_are_answered_keyed_by_their_hash(setup, payload: bytes) -> None:  # type: ignore[no-untyped-def]
    commands, handler, outbox = setup
    await commands.handle("write", payload)
    await commands.handle("write", payload)  # the same bad message again: one answer
    answers = results(outbox)
    assert len(answers) == 1
    ((subject, body),) = answers.items()
    assert subject.startswith("invalid-") and body["status"] == "invalid" and body["command_id"] is None
    assert handler.applied == []
