"""systemd integration: ``READY=1`` once the gateway is up, ``WATCHDOG=1`` while it is healthy, ``STOPPING=1`` on the
way out, sent over ``$NOTIFY_SOCKET`` (the sd_notify protocol: one unix datagram per message, ``KEY=value`` lines).

Owns the notify socket and the watchdog task. Uses only the standard library (no libsystemd binding), and does
nothing at all when ``NOTIFY_SOCKET`` is not set (a terminal, a container, a test). Must never import aiohttp, a
driver or a protocol library.

The watchdog is *withheld*, not faked: a ping goes out every ``WATCHDOG_USEC / 2`` only while the event loop runs this
task on time and the outbox can still be written. If the loop is wedged or the disk refuses writes for longer than
``WatchdogSec``, systemd kills and restarts the gateway (``Restart=always``), which is what an unattended box needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.supervisor import Gateway

log = logging.getLogger(__name__)


def socket_address(value: str) -> str:
    """``$NOTIFY_SOCKET`` as a socket address: a leading ``@`` names a Linux abstract socket (NUL byte)."""
    if not value or value[0] not in "/@":
        raise ValueError(f"NOTIFY_SOCKET must be an absolute path or start with @, got {value!r}")
    return "\0" + value[1:] if value.startswith("@") else value


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``, as sd_watchdog_enabled advises), or None when systemd set
    no watchdog for this process. Raises ValueError for a malformed value."""
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process (we were started by a wrapper that forgot to unset)
    if not usec_text.isdigit() or int(usec_text) == 0:
        raise ValueError(f"WATCHDOG_USEC must be a positive number of microseconds, got {usec_text!r}")
    return int(usec_text) / 2 / 1e6


class Notifier:
    """A datagram socket to systemd. ``send`` never raises: a lost notification must not take the gateway down."""

    def __init__(self, address: str) -> None:
        self.address = socket_address(address)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._failing = False
        self.sent = 0

    def send(self, message: str) -> bool:
        try:
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._failing:  # one line per outage of the notify socket, not one per ping
                log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), exc)
            self._failing = True
            return False
        if self._failing:
            log.info("systemd notify socket reachable again")
        self._failing = False
        self.sent += 1
        return True

    def close(self) -> None:
        self._sock.close()


def health_problem(gateway: Gateway) -> str | None:
    """Why the watchdog must not be fed right now, or None when it may."""
    outbox = gateway.outbox
    if outbox is None:
        return "the outbox is not open"
    if not outbox.writable():
        return f"the outbox cannot be written: {outbox.stats.last_error or 'closed'}"
    return None


def _ready_message(gateway: Gateway) -> str:
    identity = gateway.site.config.gateway
    return (
        f"READY=1\nSTATUS=gateway {identity.site}/{identity.id} up: {len(gateway.site.config.devices)} devices, "
        f"{len(gateway.registry)} points\nMAINPID={os.getpid()}"
    )


async def run_watchdog(gateway: Gateway, notifier: Notifier, interval: float | None, stopping: asyncio.Event) -> None:
    """Feed the watchdog every ``interval`` seconds while healthy; send ``STOPPING=1`` once ``stopping`` is set."""
    loop = asyncio.get_running_loop()
    healthy = True
    try:
        while interval is not None and not stopping.is_set():
            problem = health_problem(gateway)
            if problem is None:
                notifier.send("WATCHDOG=1")
                if not healthy:
                    log.info("watchdog fed again: the gateway is healthy")
            elif healthy:
                log.error("watchdog withheld: %s (systemd restarts the gateway if this lasts WatchdogSec)", problem)
            healthy = problem is None
            due = loop.time() + interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=interval)
            lag = loop.time() - due
            if lag > interval:  # the loop was blocked: the next ping may already be too late
                log.warning("event loop stalled %.1f s (watchdog interval %.1f s)", lag, interval)
        await stopping.wait()
    finally:
        notifier.send("STOPPING=1")
        notifier.close()


def attach(gateway: Gateway, env: Mapping[str, str] | None = None) -> Notifier | None:
    """Wire systemd notifications into ``gateway`` when run under systemd (``$NOTIFY_SOCKET`` set); else do nothing.

    Raises ValueError for a malformed ``NOTIFY_SOCKET`` or ``WATCHDOG_USEC`` (systemd never sets those; a
    hand-written environment might, and silently running without the watchdog would be worse).
    """
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return None
    interval = watchdog_interval(env)
    notifier = Notifier(address)

    def ready() -> None:
        notifier.send(_ready_message(gateway))

    gateway.on_ready.append(ready)
    gateway.extra_tasks.append(("systemd.watchdog", functools.partial(run_watchdog, gateway, notifier, interval)))
    log.debug("systemd notify socket %s, watchdog every %s s", address, interval)
    return notifier
