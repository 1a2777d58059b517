"""Argument types shared by the command line: durations, counts, ``HOST:PORT`` and a gateway's status URL.

Each is an ``argparse`` ``type=``: a bad value raises ``argparse.ArgumentTypeError``, so argparse prints its
one-line usage error and the process exits 2, as ``gateway.cli`` promises for usage errors. Durations reuse
``gateway.config.types.parse_duration``, so ``--duration 1min`` means what ``1min`` means in a site file.

Must never import a protocol library (it is loaded for ``--help``).
"""

from __future__ import annotations

import argparse
import urllib.parse
from collections.abc import Callable

from gateway.config.types import parse_duration


def duration(text: str) -> float:
    """``90``, ``500ms``, ``1min``, ``2h`` -> seconds (more than zero)."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be more than zero, got {text!r}")
    return seconds


def int_range(low: int, high: int) -> Callable[[str], int]:
    """An integer from ``low`` to ``high`` inclusive."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10 if text.strip().isdigit() else 0)  # 0x10 as well; 010 is ten, not an error
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range {low}-{high}")
        return value

    parse.__name__ = f"int {low}-{high}"  # argparse names the type in some messages
    return parse


def host_port(default_port: int) -> Callable[[str], tuple[str, int]]:
    """``host``, ``host:port`` or ``[v6addr]:port`` -> (host, port)."""

    def parse(text: str) -> tuple[str, int]:
        host, port_text = text, ""
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
            port_text = rest[1:]
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        if not host:
            raise argparse.ArgumentTypeError(f"{text!r} has no host: use HOST:PORT, like 192.168.1.20:502")
        if not port_text and not text.endswith(":"):
            return host, default_port
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise argparse.ArgumentTypeError(f"invalid port {port_text!r} in {text!r}: use a number 1-65535")
        return host, int(port_text)

    parse.__name__ = "HOST:PORT"
    return parse


def gateway_url(text: str) -> str:
    """A gateway's status address; ``host:port`` alone means ``http://host:port``. No trailing slash."""
    url = text.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not a gateway address: use http://HOST:PORT")
    try:
        parts.port  # noqa: B018 (a bad port raises here, not later inside urllib)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} has an invalid port") from None
    return url.rstrip("/")
