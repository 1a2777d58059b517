"""Preflight: every refusal ``run`` makes at start, found without opening a connection or creating a file.

Owns ``load_checked_site(path)`` (a refused site file still has its rule files checked) and
``preflight(site, ...)``, the one list of start-time checks that ``check`` reports and ``run`` applies before it
takes the data directory's lock, so a site that passes ``check`` starts:

- rule files, loaded against the site's registry (as ``run`` loads them);
- incentives: the cross-checks of ``gateway.incentives.config.validate_against`` and the key files (readable, owner
  only, well-formed), resolved against the data directory; a missing key is fine only with
  ``generate_missing_keys: true`` (``run`` creates it, ``check`` does not) and a ledger holding no records yet;
  an existing ledger (read-only) of another version, or whose epoch in force has other money settings;
- the status page's address and token rule (``gateway.http.access``, the function the server applies);
- uplinks: the platform's command public key and its TLS files (loaded into an SSL context, never connected);
- drivers and uplinks: each plugin's ``preflight`` (gateway/plugins.py) and the bindings each driver checks when its
  sources are built (MQTT subscriptions, MQTT brokers' TLS files);
- the data directory: ``check`` only (``run`` reports it itself, as a runtime failure, exit 3).

What it cannot know without running is left to ``run`` (exit 3, a runtime failure): a port already taken, a lock
held by another gateway, an outbox or ledger file that cannot be opened, a device or broker that does not answer.
Must never import a protocol library at module level (``check`` loads it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config.site import Site, SiteError, load_site
from gateway.errors import ConfigError, Diagnostic, GatewayError

if TYPE_CHECKING:
    from gateway.incentives.record import Pseudonymizer


def load_checked_site(path: Path | str) -> Site:
    """``load_site``; when the site file is refused, its rule files are still checked, against the points of the
    devices that did load, and every problem of both is raised at once (a broken device must not hide an unknown
    point in a rule file until the next run). Points of devices that did not load are not checked: the device's
    own error stands for them."""
    try:
        return load_site(path)
    except SiteError as exc:
        partial = exc.partial
        problems = list(exc.diagnostics)
    if partial.rule_files:
        from rules.loader import load_rule_set

        try:
            load_rule_set(
                partial.rule_files,
                partial.registry,
                timezone=partial.timezone,
                unchecked_devices=partial.unchecked_devices,
            )
        except ConfigError as rule_errors:
            problems.extend(rule_errors.diagnostics)
    raise ConfigError(problems)


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
    if runtime is not None:
        runtime.close()
    return []


def _incentives(site: Site, data_dir: Path | None) -> list[Diagnostic]:
    config = site.config.incentives
    if config is None:
        return []
    from gateway.incentives.config import validate_against
    from gateway.incentives.record import KeyFileError, Pseudonymizer, load_private_key, load_pseudonym_key

    problems = validate_against(site)
    missing: list[str] = []
    pseudonym_key: bytes | None = None
    for key, configured in (
        ("signing_key_file", config.signing_key_file),
        ("pseudonym_key_file", config.pseudonym_key_file),
    ):
        path = configured
        if not path.is_absolute():
            if data_dir is None:
                continue
            path = data_dir / path  # as the incentive stage resolves it: beside the ledger
        if not path.exists() and config.generate_missing_keys:
            missing.append(str(path))  # run creates it on first start, unless the ledger already holds records
            continue
        try:
            if key == "signing_key_file":
                load_private_key(path)
            else:
                pseudonym_key = load_pseudonym_key(path)
        except KeyFileError as exc:
            hint = ""
            if not configured.is_absolute() and not path.exists():
                hint = f" (a relative key file is looked up in the data directory {data_dir}: see --data-dir)"
            problems.append(site.diagnostic(("incentives", key), f"{exc}{hint}"))
    if problems or data_dir is None:
        return problems
    pseudonyms = Pseudonymizer(pseudonym_key) if pseudonym_key is not None else None
    return _ledger(site, data_dir, missing, pseudonyms)


def _ledger(site: Site, data_dir: Path, missing_keys: list[str], pseudonyms: Pseudonymizer | None) -> list[Diagnostic]:
    """What the incentive stage refuses about an existing ledger (read-only; a new data directory has none): keys to
    be generated for a ledger that already holds records, and money settings changed since the epoch in force."""
    import sqlite3

    from gateway.incentives.ledger import LEDGER_FILE, Ledger, version_problem
    from gateway.incentives.programme import build_programme
    from gateway.incentives.stage import settle_epoch

    config = site.config.incentives
    path = data_dir / LEDGER_FILE
    if config is None or not path.is_file():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error:
        return []  # run reports a ledger it cannot open itself (a runtime failure, exit 3)
    try:
        if (problem := version_problem(db, path)) is not None:
            return [Diagnostic(str(site.path), 0, 0, problem)]
        ledger = Ledger(db)
        if missing_keys and ledger.has_records():
            names = ", ".join(missing_keys)
            message = (
                f"key file(s) {names} missing but the ledger already holds records: restore them from "
                "backup (new keys would break the chain's pseudonyms)"
            )
            return [site.diagnostic(("incentives", "generate_missing_keys"), message)]
        if pseudonyms is not None:
            zone_name = config.timezone or site.config.gateway.timezone
            settle_epoch(site, ledger, build_programme(config, site.registry, pseudonyms, zone_name), None)
    except ConfigError as exc:  # ProgrammeChanged: the operator must start a new epoch on purpose
        return list(exc.diagnostics)
    except (sqlite3.Error, GatewayError):
        return []  # a ledger run will refuse as a store failure (exit 3), not as a config problem
    finally:
        db.close()
    return []


def _status_page(site: Site, http_listen: str | None) -> list[Diagnostic]:
    from gateway.http.access import check_listen, effective_listen

    listen = effective_listen(site, http_listen)
    if listen is not None:
        check_listen(site, listen)
    return []


def _uplinks(site: Site) -> list[Diagnostic]:
    """Each configured uplink's own checks (the platform's command key and TLS files), without connecting."""
    from gateway.plugins import plugins

    problems: list[Diagnostic] = []
    for name, plugin in plugins().uplinks.items():
        config = site.config.uplinks.configured(name)
        if config is not None:
            problems.extend(_collect(partial(plugin.preflight, site, config)))
    return problems


def tls_message(files: tuple[Path | None, ...], exc: Exception) -> str:
    """One line for TLS files that do not load (drivers and uplinks word it alike)."""
    named = ", ".join(str(path) for path in files if path is not None) or "the system trust store"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    return f"cannot load the TLS files ({named}): {reason}"


def _drivers(site: Site) -> list[Diagnostic]:
    """The sources each used driver builds (bindings it checks then), and each driver's own checks."""
    from gateway.plugins import drivers_named
    from gateway.supervisor import build_sources

    build_sources(site)  # builds objects only: nothing is opened until a source runs
    used = {device.driver for device in site.config.devices}
    problems: list[Diagnostic] = []
    for plugin in drivers_named(used).values():
        problems.extend(_collect(partial(plugin.preflight, site)))
    return problems


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
