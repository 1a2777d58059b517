"""Preflight: every refusal ``run`` makes at start, found without opening a connection or creating a file.

Owns ``preflight(site, ...)``, the one list of start-time checks that ``check`` reports and ``run`` applies before it
takes the data directory's lock, so a site that passes ``check`` starts:

- rule files, loaded against the site's registry (as ``run`` loads them);
- incentives: the cross-checks of ``gateway.incentives.config.validate_against`` and the key files (readable, owner
  only, well-formed), resolved against the data directory; a missing key is fine only with
  ``generate_missing_keys: true`` (``run`` creates it, ``check`` does not);
- the status page's address and token rule (``gateway.http.access``, the function the server applies);
- uplinks: the platform's command public key and its TLS files (loaded into an SSL context, never connected);
- drivers: the bindings each driver checks when its sources are built (MQTT subscriptions);
- the data directory: ``check`` only (``run`` reports it itself, as a runtime failure, exit 3).

What it cannot know without running is left to ``run``: a port already taken, a lock held by another gateway, a
device or broker that does not answer, a ledger whose programme changed. Must never import a protocol library at
module level (``check`` loads it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from gateway.config.site import Site
from gateway.errors import ConfigError, Diagnostic


def preflight(
    site: Site, *, data_dir: Path | None, http_listen: str | None, check_data_dir: bool = True
) -> list[Diagnostic]:
    """Every problem ``run SITE --data-dir DATA_DIR --http HTTP_LISTEN`` would refuse to start with.

    ``data_dir`` None means keys relative to the data directory are not checked (and neither is the directory)."""
    problems: list[Diagnostic] = []
    for step in (
        lambda: _rules(site),
        lambda: _incentives(site, data_dir),
        lambda: _status_page(site, http_listen),
        lambda: _uplinks(site),
        lambda: _drivers(site),
    ):
        problems.extend(_collect(step))
    if check_data_dir and data_dir is not None:
        problems.extend(_data_dir(site, data_dir))
    return problems


def raise_for(site: Site, *, data_dir: Path | None, http_listen: str | None, check_data_dir: bool = True) -> None:
    """``preflight`` as an exception: ConfigError with every problem, or nothing."""
    problems = preflight(site, data_dir=data_dir, http_listen=http_listen, check_data_dir=check_data_dir)
    if problems:
        raise ConfigError(problems)


def _collect(step: Callable[[], list[Diagnostic]]) -> list[Diagnostic]:
    try:
        return step()
    except ConfigError as exc:
        return list(exc.diagnostics)


def _rules(site: Site) -> list[Diagnostic]:
    from gateway.supervisor import load_rules

    runtime = load_rules(site, site.registry, None)
    if runtime is not None and hasattr(runtime, "close"):
        runtime.close()
    return []


def _incentives(site: Site, data_dir: Path | None) -> list[Diagnostic]:
    config = site.config.incentives
    if config is None:
        return []
    from gateway.incentives.config import validate_against
    from gateway.incentives.record import KeyFileError, load_private_key, load_pseudonym_key

    problems = validate_against(site)
    keys: list[tuple[str, Path, Callable[[Path], object]]] = [
        ("signing_key_file", config.signing_key_file, load_private_key),
        ("pseudonym_key_file", config.pseudonym_key_file, load_pseudonym_key),
    ]
    for key, configured, load in keys:
        path = configured
        if not path.is_absolute():
            if data_dir is None:
                continue
            path = data_dir / path  # as the incentive stage resolves it: beside the ledger
        if not path.exists() and config.generate_missing_keys:
            continue  # run creates it on first start (the stage refuses if the ledger already holds records)
        try:
            load(path)
        except KeyFileError as exc:
            problems.append(site.diagnostic(("incentives", key), str(exc)))
    return problems


def _status_page(site: Site, http_listen: str | None) -> list[Diagnostic]:
    from gateway.http.access import check_listen, effective_listen

    listen = effective_listen(site, http_listen)
    if listen is not None:
        check_listen(site, listen)
    return []


def _uplinks(site: Site) -> list[Diagnostic]:
    platform = site.config.uplinks.platform
    if platform is None:
        return []
    problems: list[Diagnostic] = []
    if platform.commands and platform.command_public_key_file is not None:
        from gateway.incentives.record import KeyFileError, load_public_key

        try:
            load_public_key(platform.command_public_key_file)
        except KeyFileError as exc:
            problems.append(site.diagnostic(("uplinks", "platform", "command_public_key_file"), str(exc)))
    if platform.tls is not None:
        import ssl

        from gateway.uplinks.mqtt import tls_context

        try:
            tls_context(platform)
        except (OSError, ssl.SSLError, ValueError) as exc:
            message = f"cannot use the TLS files: {getattr(exc, 'strerror', None) or exc}"
            problems.append(site.diagnostic(("uplinks", "platform", "tls"), message))
    return problems


def _drivers(site: Site) -> list[Diagnostic]:
    from gateway.supervisor import build_sources

    build_sources(site)  # builds objects only: nothing is opened until a source runs
    return []


def _data_dir(site: Site, data_dir: Path) -> list[Diagnostic]:
    """The directory ``run`` would lock, or create (0700) from its nearest existing parent."""
    existing = data_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        message = f"data directory {data_dir}: {existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        verb = "use" if existing == data_dir else "create"
        message = f"data directory {data_dir}: cannot {verb} it ({existing} is not writable by this user)"
    else:
        return []
    return [Diagnostic(str(site.path), 0, 0, message)]
