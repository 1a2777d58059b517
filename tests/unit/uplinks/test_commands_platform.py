"""Platform commands: applied through the handler at most once (journalled across compaction and restarts),
refused or failed with a reason, strict about their JSON and their time, invalid ones answered."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from gateway.command_journal import JOURNAL_FILE, CommandJournal
from gateway.errors import DeviceUnavailable, WriteRejected
from gateway.model import Command
from gateway.outbox import Outbox, encode_event
from gateway.platform_commands import PlatformCommands, StrictJsonError, payload_hash, strict_loads

NOW_NS = 1_795_000_000 * 10**9
NOW_MS = NOW_NS // 10**6


class Clock:
    def __init__(self) -> None:
        self.ns = NOW_NS

    def __call__(self) -> int:
        return self.ns


class Handler:
    def __init__(self) -> None:
        self.applied: list[Command] = []

    async def __call__(self, command: Command) -> None:
        if command.point == "ahu3.locked":
            raise WriteRejected("ahu3.locked: not in the allow list")
        if command.point == "ahu3.offline":
            raise DeviceUnavailable("ahu3: no answer after 3 retries")
        if command.point == "ahu3.buggy":
            self.applied.append(command)  # it may well have reached the device
            raise RuntimeError("a bug after the write")
        if isinstance(command.value, int | float) and not 20 <= command.value <= 100:
            raise WriteRejected(f"{command.point}: {command.value} outside 20..100")
        self.applied.append(command)


@dataclass
class Setup:
    tmp_path: Path
    handler: Handler
    clock: Clock
    outbox: Outbox
    commands: PlatformCommands

    def restart(self, *, new_outbox: bool = False) -> PlatformCommands:
        """A new PlatformCommands on the same journal file (the process restarted)."""
        self.commands.close()
        if new_outbox:  # stands for an outbox whose results were delivered and compacted away
            self.outbox = Outbox(self.tmp_path / f"o{len(os.listdir(self.tmp_path))}.db")
        self.commands = make(self.tmp_path, self.handler, self.outbox, self.clock)
        return self.commands


def make(tmp_path: Path, handler: Handler, outbox: Outbox, clock: Clock) -> PlatformCommands:
    journal = CommandJournal(tmp_path / JOURNAL_FILE)
    return PlatformCommands(handler, outbox, journal, gateway_id="gw1", max_age=60, max_skew=5, time_ns=clock)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    outbox = Outbox(tmp_path / "o.db")
    handler, clock = Handler(), Clock()
    s = Setup(tmp_path, handler, clock, outbox, make(tmp_path, handler, outbox, clock))
    yield s
    s.commands.close()
    await s.outbox.close()


def results(outbox: Outbox) -> dict[str, dict[str, object]]:
    return {s.event.subject: s.event.body for s in outbox.read_events(0, limit=100)}


def result_bytes(outbox: Outbox) -> list[bytes]:
    return [encode_event(s.event) for s in outbox.read_events(0, limit=100)]


def raw(command_id: str, value: bytes) -> bytes:
    """A payload written by hand, for what no serialiser would produce."""
    return b'{"v":1,"id":"%s","ts":%d,"point":"ahu3.setpoint","value":%s}' % (command_id.encode(), NOW_MS, value)


def cmd(**fields: object) -> bytes:
    return orjson.dumps({"v": 1, "ts": NOW_MS - 1000, **fields})


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
        ("write", cmd(id="c8", point="ahu3.setpoint", value=40, ts=NOW_MS - 61_000), "refused", "is 61s old"),
        ("write", cmd(id="c8b", point="ahu3.setpoint", value=40, ts=NOW_MS - 60_000), "applied", None),
        ("write", cmd(id="c9", point="ahu3.setpoint", value=40, ts=NOW_MS + 6_000), "refused", "6s ahead of"),
        ("write", cmd(id="c9b", point="ahu3.setpoint", value=40, ts=NOW_MS + 5_000), "applied", None),
        ("write", cmd(id="c10", point="ahu3.setpoint", value=40, ts=NOW_MS + 365 * 86_400_000), "refused", "ahead"),
        ("write", orjson.dumps({"v": 1, "id": "c11", "point": "ahu3.setpoint", "value": 40}), "invalid", "ts (Unix"),
        ("write", cmd(id="c12", point="ahu3.setpoint", value=40, ts="now"), "invalid", "ts must be an integer"),
        ("write", cmd(id="c13", point="ahu3.setpoint", value=40, ts=True), "invalid", "ts must be an integer"),
        ("write", cmd(id="c14", point="ahu3.setpoint", value=40, v=2), "invalid", "version"),
        ("reboot", cmd(id="c15"), "invalid", "unknown command 'reboot'"),
        # strict JSON: the value the device would get must not depend on which parser reads the payload
        ("write", raw("c16", b'150,"value":45'), "invalid", "duplicate key 'value'"),
        ("write", raw("c17", b"NaN"), "invalid", "NaN is not a JSON number"),
        ("write", raw("c18", b"-Infinity"), "invalid", "-Infinity"),
        ("write", raw("c19", b"1e400"), "invalid", "out of range"),
        ("write", raw("c20", b"9007199254740993"), "invalid", "out of range"),
        ("write", raw("c21", b"1" + b"0" * 400), "invalid", "out of range"),
    ],
)  # fmt: skip
async def test_each_command_gets_one_answer_saying_why(
    setup: Setup, action: str, payload: bytes, status: str, reason: str | None
) -> None:
    await setup.commands.handle(action, payload)
    ((_subject, body),) = results(setup.outbox).items()
    assert body["status"] == status
    assert (body["message"] is None) if reason is None else (reason in str(body["message"]))
    assert len(setup.handler.applied) == (1 if status == "applied" else 0)


def test_strict_json_refuses_what_lenient_parsers_accept() -> None:
    assert strict_loads(b'{"a": [1, 2.5, "x", true, null], "b": {"c": -9007199254740992}}') == {
        "a": [1, 2.5, "x", True, None],
        "b": {"c": -9007199254740992},
    }
    for bad in (b'{"a":1,"a":1}', b'{"o":{"k":1,"k":2}}', b"[NaN]", b"[Infinity]", b"[1e999]", b"[9007199254740993]"):
        with pytest.raises(StrictJsonError):
            strict_loads(bad)
    # the same command re-serialised (other key order, whitespace) is the same command
    a, b = b'{"id":"x","value":1}', b'{ "value": 1, "id": "x" }'
    assert payload_hash(strict_loads(a), a) == payload_hash(strict_loads(b), b)


async def test_a_repeat_is_answered_with_the_first_result_bytes_after_compaction_and_restart(setup: Setup) -> None:
    payload = cmd(id="dr-42", point="ahu3.setpoint", value=60)
    await setup.commands.handle("write", payload)
    (first,) = result_bytes(setup.outbox)
    setup.clock.ns += 3 * 10**9
    await setup.commands.handle("write", payload)  # the result is still in the outbox: nothing new to send
    assert result_bytes(setup.outbox) == [first]
    # delivered and compacted away (a fresh outbox stands for that), and the gateway restarted; minutes later
    setup.clock.ns += 300 * 10**9  # beyond max_age too: a known id is answered, not judged stale
    restarted = setup.restart(new_outbox=True)
    await restarted.handle("write", payload)
    assert result_bytes(setup.outbox) == [first]
    assert [c.value for c in setup.handler.applied] == [60]
    assert setup.handler.applied[0].origin == "platform"
    assert restarted.duplicates == 1


async def test_a_reserialised_repeat_is_a_repeat_and_a_different_payload_under_a_used_id_is_refused(
    setup: Setup,
) -> None:
    await setup.commands.handle("write", cmd(id="dr-43", point="ahu3.setpoint", value=78))
    (first,) = setup.outbox.read_events(0, limit=10)
    again = orjson.loads(cmd(id="dr-43", point="ahu3.setpoint", value=78))
    await setup.commands.handle("write", orjson.dumps(dict(reversed(again.items()))))
    await setup.commands.handle("write", cmd(id="dr-43", point="ahu3.setpoint", value=79))
    events = [s.event for s in setup.outbox.read_events(0, limit=10)]
    assert [c.value for c in setup.handler.applied] == [78]
    assert events[0] == first.event and len(events) == 2
    conflict = events[1]
    assert conflict.subject == "dr-43" and conflict.id.startswith("cmd-result:dr-43:conflict-")
    assert conflict.body["status"] == "refused" and "already used for a different command" in conflict.body["message"]
    # the stale-refused command keeps its answer too: its id cannot be reused with a fresh ts
    await setup.commands.handle("write", cmd(id="dr-44", point="ahu3.setpoint", value=50, ts=NOW_MS - 120_000))
    await setup.commands.handle("write", cmd(id="dr-44", point="ahu3.setpoint", value=50))
    assert results(setup.outbox)["dr-44"]["status"] == "refused"
    assert [c.value for c in setup.handler.applied] == [78]


async def test_a_crash_between_write_and_result_is_answered_unknown_and_never_reapplied(setup: Setup) -> None:
    payload = cmd(id="dr-45", point="ahu3.setpoint", value=70)
    # what `handle` commits before writing to the device; the process dies before the result is stored
    setup.commands.journal.receive("dr-45", payload_hash(orjson.loads(payload), payload), NOW_NS)
    restarted = setup.restart()
    await restarted.recover()
    (answer,) = setup.outbox.read_events(0, limit=10)
    assert answer.event.id == "cmd-result:dr-45"
    assert answer.event.body["status"] == "unknown" and "not applied again" in answer.event.body["message"]
    await restarted.handle("write", payload)  # the platform retries: the same answer, no write
    assert setup.handler.applied == []
    assert result_bytes(setup.outbox) == [encode_event(answer.event)]


async def test_an_unexpected_error_while_applying_is_answered_unknown_and_not_retried(setup: Setup) -> None:
    payload = cmd(id="dr-48", point="ahu3.buggy", value=50)
    await setup.commands.handle("write", payload)
    await setup.commands.handle("write", payload)
    (answer,) = setup.outbox.read_events(0, limit=10)
    assert answer.event.body["status"] == "unknown" and "RuntimeError" in answer.event.body["message"]
    assert len(setup.handler.applied) == 1


async def test_a_crash_between_result_and_outbox_sends_the_stored_result_on_restart(setup: Setup) -> None:
    setup.commands.journal.receive("dr-46", "h", NOW_NS)
    stored = {"id": "cmd-result:dr-46", "subject": "dr-46", "ts": NOW_NS + 1, "body": {"status": "applied"}}
    setup.commands.journal.settle("dr-46", stored)
    await setup.restart().recover()
    (answer,) = setup.outbox.read_events(0, limit=10)
    assert answer.event.ts == NOW_NS + 1 and answer.event.body == {"status": "applied"}
    assert setup.commands.journal.unanswered() == []


async def test_the_journal_is_private_and_forgets_after_seven_days(setup: Setup) -> None:
    path = setup.tmp_path / JOURNAL_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    payload = cmd(id="dr-47", point="ahu3.setpoint", value=40)
    await setup.commands.handle("write", payload)
    setup.clock.ns += 8 * 86_400 * 10**9
    await setup.restart(new_outbox=True).recover()  # prunes at start (the result is long compacted too)
    assert setup.commands.journal.get("dr-47") is None
    await setup.commands.handle("write", payload)  # a replay that old is refused by its ts
    assert results(setup.outbox)["dr-47"]["status"] == "refused"
    assert len(setup.handler.applied) == 1


def test_a_journal_shorter_than_the_command_window_is_refused(tmp_path: Path) -> None:
    journal = CommandJournal(tmp_path / JOURNAL_FILE, retention=30)
    try:
        with pytest.raises(ValueError, match="longer than a command's max age"):
            PlatformCommands(Handler(), None, journal, gateway_id="gw1", max_age=60)  # type: ignore[arg-type]
    finally:
        journal.close()


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b"[1, 2]",
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe",
        cmd(point="ahu3.setpoint", value=1),
        cmd(id="a b"),
        cmd(id="invalid-0123456789abcdef", point="ahu3.setpoint", value=40),  # the prefix of hash-keyed answers
    ],
)
async def test_payloads_without_a_usable_id_are_answered_keyed_by_their_hash(setup: Setup, payload: bytes) -> None:
    await setup.commands.handle("write", payload)
    await setup.commands.handle("write", payload)  # the same bad message again: one answer
    answers = results(setup.outbox)
    assert len(answers) == 1
    ((subject, body),) = answers.items()
    assert subject.startswith("invalid-") and body["status"] == "invalid" and body["command_id"] is None
    assert setup.handler.applied == []
