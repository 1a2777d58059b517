"""sd_notify from the inside: environment parsing, READY on start, WATCHDOG only while healthy, STOPPING at the end.

A real unix datagram socket stands in for systemd; the watchdog interval is made tiny, and the tests wait for the
datagrams to arrive (a condition), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import systemd
from gateway.config.site import FIRMWARE_CONFIGS, load_site
from gateway.outbox import Outbox
from gateway.supervisor import Gateway


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    # a short path: unix socket paths are limited to 107 bytes, and pytest's tmp_path can be longer
    directory = Path(tempfile.mkdtemp(prefix="sdn-"))
    path = directory / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield str(path), sock
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        directory.rmdir()


async def receive(sock: socket.socket, *, timeout: float = 5.0) -> str:
    loop = asyncio.get_running_loop()
    data = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)
    return data.decode()


def make_gateway(tmp_path: Path) -> Gateway:
    return Gateway(load_site(FIRMWARE_CONFIGS / "sites" / "demo.yaml"), data_dir=tmp_path, http_listen="off")


def test_socket_address_forms() -> None:
    assert systemd.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert systemd.socket_address("@/org/freedesktop/systemd1/notify/123") == "\0/org/freedesktop/systemd1/notify/123"
    with pytest.raises(ValueError, match="absolute path or start with @"):
        systemd.socket_address("notify.sock")


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # not ours
    for bad in ("0", "30s", "-5"):
        with pytest.raises(ValueError, match="WATCHDOG_USEC must be a positive number"):
            systemd.watchdog_interval({"WATCHDOG_USEC": bad})


async def test_nothing_happens_outside_systemd(tmp_path: Path) -> None:
    gateway = make_gateway(tmp_path)
    assert systemd.attach(gateway, env={}) is None
    assert gateway.on_ready == [] and gateway.extra_tasks == []


async def test_ready_then_watchdog_then_stopping(tmp_path: Path, notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    gateway = make_gateway(tmp_path)
    notifier = systemd.attach(gateway, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    assert notifier is not None
    [(name, watchdog)] = gateway.extra_tasks
    assert name == "systemd.watchdog"

    for callback in gateway.on_ready:
        callback()
    ready = await receive(sock)
    assert ready.splitlines()[0] == "READY=1"
    assert "STATUS=gateway demo_tower/demo_gw up: 8 devices, 37 points" in ready  # 36 + the building aggregate
    assert f"MAINPID={os.getpid()}" in ready

    gateway.outbox = Outbox(tmp_path / "outbox.db")
    stopping = asyncio.Event()
    task = asyncio.ensure_future(watchdog(stopping))
    try:
        assert [await receive(sock) for _ in range(3)] == ["WATCHDOG=1"] * 3
    finally:
        stopping.set()
        await asyncio.wait_for(task, 2)
        await gateway.outbox.close()
    messages = []
    while (message := await receive(sock)) != "STOPPING=1":
        messages.append(message)
    assert set(messages) <= {"WATCHDOG=1"}


async def test_watchdog_is_withheld_while_the_outbox_cannot_be_written(
    tmp_path: Path, notify_socket: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.systemd")
    path, sock = notify_socket
    gateway = make_gateway(tmp_path)
    notifier = systemd.Notifier(path)
    outbox = Outbox(tmp_path / "outbox.db")
    await outbox.close()  # a closed outbox reports itself unwritable, as one whose disk failed does
    gateway.outbox = outbox
    stopping = asyncio.Event()
    task = asyncio.ensure_future(systemd.run_watchdog(gateway, notifier, 0.01, stopping))
    await asyncio.sleep(0.1)  # ten intervals without a ping: here the absence of a message is the result
    assert "watchdog withheld: the outbox cannot be written" in caplog.text
    assert caplog.text.count("watchdog withheld") == 1  # one line per outage, not one per interval
    with pytest.raises(BlockingIOError):
        sock.recv(4096)  # and no ping went out

    gateway.outbox = Outbox(tmp_path / "outbox2.db")
    try:
        assert await receive(sock) == "WATCHDOG=1"
        assert "watchdog fed again" in caplog.text
    finally:
        stopping.set()
        await asyncio.wait_for(task, 2)
        await gateway.outbox.close()


async def test_a_missing_notify_socket_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = systemd.Notifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="gateway.systemd"):
        assert notifier.send("WATCHDOG=1") is False
        assert notifier.send("WATCHDOG=1") is False
    assert caplog.text.count("cannot notify systemd") == 1
    notifier.close()
