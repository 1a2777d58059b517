"""Who may reach the status page: the listen address and the access token rule, checked without binding.

Owns ``parse_listen``, ``is_loopback`` and ``load_token``: a bind on anything but loopback needs ``http.token_file``
(a file holding a token of 16+ characters). The server (``gateway.http.server``) applies them when it starts and
``gateway.preflight`` applies the very same functions for ``check``, so the two cannot disagree.

Must never import aiohttp or any protocol library (``check`` loads it).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from gateway.config.site import Site
from gateway.config.types import Secret, read_secret_file
from gateway.errors import ConfigError, Diagnostic

#: the shortest access token accepted
MIN_TOKEN_CHARS = 16


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"``, ``"[::1]:8080"``, ``"0.0.0.0:80"`` -> (host, port). Raises ValueError."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"listen address {listen!r} must be HOST:PORT (e.g. 127.0.0.1:8080 or [::]:8080)")
    host = host.removeprefix("[").removesuffix("]")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address {listen!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public address, so it counts as public


def listen_diagnostic(site: Site, listen: str, message: str) -> Diagnostic:
    """At ``http.listen`` when the address comes from the site file, else named as the ``--http`` option."""
    if listen == site.config.http.listen:
        return site.diagnostic(("http", "listen"), message)
    return Diagnostic(str(site.path), 0, 0, f"--http {listen}: {message}")


def effective_listen(site: Site, http_listen: str | None) -> str | None:
    """The address the status page would listen on (``--http`` over ``http.listen``), or None when it is off."""
    listen = http_listen if http_listen is not None else site.config.http.listen
    if not site.config.http.enabled or not listen or listen == "off":
        return None
    return listen


def check_listen(site: Site, listen: str) -> tuple[str, int, Secret | None]:
    """(host, port, token) for ``listen``; raises ConfigError for a bad address or a refused token rule."""
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise ConfigError([listen_diagnostic(site, listen, str(exc))]) from None
    return host, port, load_token(site, listen, host)


def load_token(site: Site, listen: str, host: str) -> Secret | None:
    """The access token, or None for a loopback bind without one. Raises ConfigError (never logs the token)."""
    token_file = site.config.http.token_file
    if token_file is None:
        if is_loopback(host):
            return None
        raise ConfigError(
            [
                listen_diagnostic(
                    site,
                    listen,
                    f"the status page would listen on {host}, which is not loopback: set http.token_file "
                    "(a file holding an access token) or listen on 127.0.0.1",
                )
            ]
        )
    path = token_file if token_file.is_absolute() else Path(site.path).parent / token_file
    try:
        token = read_secret_file(path)
    except ValueError as exc:
        raise ConfigError([site.diagnostic(("http", "token_file"), str(exc))]) from None
    if len(token.reveal()) < MIN_TOKEN_CHARS:
        raise ConfigError(
            [
                site.diagnostic(
                    ("http", "token_file"), f"the token in {path} is shorter than {MIN_TOKEN_CHARS} characters"
                )
            ]
        )
    return token
