"""The gateway's own commands: ``run``, ``demo``, ``check`` and ``tail``.

Owns process-level concerns: signals, the event loop (uvloop where installed), the data directory, exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import logging
import os
import signal
import sys
import tempfile
import time
import urllib.error
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from gateway import arguments
from gateway.config.site import FIRMWARE_CONFIGS, Site
from gateway.errors import ConfigError, GatewayError
from gateway.model import Sample

log = logging.getLogger(__name__)

DEMO_SITE = FIRMWARE_CONFIGS / "sites" / "demo.yaml"
_DEFAULT_URL = "http://127.0.0.1:8080"


def default_data_dir(site: Site) -> Path:
    """systemd's StateDirectory when run as a service, else the per-user XDG state directory."""
    if state := os.environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0])
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "edge-gateway" / f"{site.config.gateway.site}-{site.config.gateway.id}"


def run_async(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where installed (25-40% less CPU per message, FIELD-NOTES.md), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _load_or_report(path: Path) -> Site | None:
    from gateway.preflight import load_checked_site

    try:
        site = load_checked_site(path)  # a refused site file still has its rule files checked, as by `check`
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        print(f"{path}: {len(exc.diagnostics)} error(s); not started", file=sys.stderr)
        return None
    for warning in site.warnings:
        log.warning("%s", warning.format())
    return site


async def serve_site(
    site: Site,
    *,
    data_dir: Path,
    duration: float | None,
    http: str | None,
    on_gateway: Callable[[Any], None] | None = None,
    stop: asyncio.Event | None = None,
    interrupt_code: int = 0,
) -> int:
    """Run a gateway until SIGTERM/SIGINT, ``stop`` is set or ``duration`` seconds; SIGHUP reloads the rules.

    A stop by SIGINT returns ``interrupt_code`` once the gateway has stopped cleanly: 0 for ``run`` and ``demo``
    (Ctrl-C is their documented way to stop), 130 for ``tail --demo`` (interrupted, as any Unix tool)."""
    from gateway import systemd
    from gateway.supervisor import Gateway

    gateway = Gateway(site, data_dir=data_dir, http_listen=http)
    systemd.attach(gateway)
    if on_gateway is not None:
        on_gateway(gateway)
    stop = stop or asyncio.Event()
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        stop.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGHUP, gateway.request_reload)
    timer = loop.call_later(duration, stop.set) if duration is not None else None
    try:
        await gateway.run(stop)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except GatewayError as exc:
        log.error("gateway failed: %s", exc)
        return 3
    finally:
        if timer is not None:
            timer.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    # stopped while the disk refused writes: the supervisor has reported what was not stored, in one line
    if gateway.store_lost:
        return 3
    return interrupt_code if interrupted else 0


def _cmd_run(args: argparse.Namespace, site_path: Path) -> int:
    from gateway.preflight import raise_for

    site = _load_or_report(site_path)
    if site is None:
        return 1
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir(site)
    try:
        # what `check` reports; the data directory is the supervisor's to refuse (a runtime failure, exit 3)
        raise_for(site, data_dir=data_dir, http_listen=args.http, check_data_dir=False)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        print(f"{site_path}: {len(exc.diagnostics)} error(s); not started", file=sys.stderr)
        return 1
    return run_async(serve_site(site, data_dir=data_dir, duration=args.duration, http=args.http))


def cmd_run(args: argparse.Namespace) -> int:
    return _cmd_run(args, Path(args.site))


def cmd_demo(args: argparse.Namespace) -> int:
    return _cmd_run(args, DEMO_SITE)


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 when every site would start as `run` starts it (warnings are printed, on stderr, and do not fail it),
    1 otherwise; with ``--strict`` a warning (a literal secret in a site file) fails the check too."""
    from gateway.plugins import plugins
    from gateway.preflight import load_checked_site, raise_for

    # every installed plugin is tried, so one that cannot be loaded is logged even where no site uses it (`run`
    # loads only the drivers its site names)
    _ = plugins().broken
    failed = 0
    for path in args.sites:
        try:
            site = load_checked_site(path)  # a refused site file still has its rule files checked
            # exactly what `run` refuses at start, with the same --data-dir and --http
            data_dir = Path(args.data_dir) if args.data_dir else default_data_dir(site)
            raise_for(site, data_dir=data_dir, http_listen=args.http)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            print(f"{path}: {len(exc.diagnostics)} error(s)", file=sys.stderr)
            failed += 1
            continue
        for warning in site.warnings:
            print(warning.format(), file=sys.stderr)
        if args.strict and site.warnings:
            print(f"{path}: {len(site.warnings)} warning(s), errors with --strict", file=sys.stderr)
            failed += 1
            continue
        warned = f", {len(site.warnings)} warning(s)" if site.warnings else ""
        print(
            f"{path}: ok ({len(site.config.devices)} devices, {len(site.registry)} points, "
            f"{len(site.rule_files)} rule files{warned})"
        )
    return 1 if failed else 0


def _format_sample(sample: Sample, unit: str | None) -> str:
    """``08:00:01.250  zone3.co2   448.628 ppm``: 6 significant digits, units as the status page shows them."""
    from gateway.http.page import format_reading, format_unit

    stamp = time.strftime("%H:%M:%S", time.localtime(sample.ts / 1e9)) + f".{sample.ts // 1_000_000 % 1000:03d}"
    value = "BAD" if sample.value is None else format_reading(sample.value)
    shown_unit = format_unit(unit) if sample.value is not None else ""
    quality = "" if sample.quality.name == "GOOD" else f" [{sample.quality.name.lower()}]"
    return f"{stamp}  {sample.point:<32} {value}{' ' + shown_unit if shown_unit else ''}{quality}"


def _matches(point: str, patterns: list[str]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(point, p) for p in patterns)


def cmd_tail(args: argparse.Namespace) -> int:
    patterns = list(args.points)
    if args.demo:
        if args.token_file is not None:
            args.usage.error("--token-file is for --url, not --demo")  # exits 2
        return _tail_demo(args, patterns)
    if args.data_dir is not None:
        args.usage.error("--data-dir is only for --demo")  # exits 2
    from gateway.http.cli import read_token

    try:
        token = read_token(args.token_file)
    except OSError as exc:
        print(f"cannot read token file {args.token_file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return _tail_remote(args.url or _DEFAULT_URL, patterns, args.duration, token)


def _tail_demo(args: argparse.Namespace, patterns: list[str]) -> int:
    site = _load_or_report(DEMO_SITE)
    if site is None:
        return 1

    async def main() -> int:
        printer: asyncio.Task[None] | None = None
        stop = asyncio.Event()

        def attach(gateway: Any) -> None:
            nonlocal printer
            # a viewer must never hold back the store: drop_oldest, counted
            sub = gateway.bus.subscribe("tail", maxsize=64, policy="drop_oldest")

            async def show() -> None:
                try:
                    async for batch in sub:
                        for sample in batch:
                            if _matches(sample.point, patterns):
                                info = site.registry.get(sample.point)
                                print(_format_sample(sample, info.unit if info else None), flush=True)
                except BrokenPipeError:
                    stop.set()  # the reader (`| head -2`) has gone: stop the gateway, then end quietly
                    raise

            printer = asyncio.ensure_future(show())

        with tempfile.TemporaryDirectory(prefix="edge-gateway-tail-") as tmp:
            code = await serve_site(
                site,
                data_dir=Path(args.data_dir or tmp),
                duration=args.duration,
                http="off",
                on_gateway=attach,
                stop=stop,
                interrupt_code=130,
            )
            if printer is not None:
                await printer
        return code

    return run_async(main())


#: after the gateway was reached once, how long a lost connection is retried (a restart) before exit 3
_RECONNECT_S = 30.0


def _tail_remote(url: str, patterns: list[str], duration: float | None, token: str | None) -> int:
    """Poll a running gateway's /api/points and print every new sample.

    Exit 3 with one line when the gateway cannot be reached at the start, or stays away for ``_RECONNECT_S`` (or
    until ``--duration`` ends) after it was reached. Ctrl-C is not caught here: ``gateway.cli`` makes it 130."""
    from gateway.http.cli import UNAUTHORISED_HINT, fetch_json

    seen: dict[str, int] = {}
    deadline = None if duration is None else time.monotonic() + duration
    lost_since: float | None = None
    reached = False
    while deadline is None or time.monotonic() < deadline:
        try:
            points = fetch_json(url, "/api/points", token=token)
            if not isinstance(points, list):
                raise ValueError("the answer is not an edge-gateway point list")
        except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors; JSONDecodeError a ValueError
            reason = getattr(exc, "reason", exc)
            if isinstance(exc, urllib.error.HTTPError):
                reason = f"HTTP {exc.code} {exc.reason}{UNAUTHORISED_HINT if exc.code == 401 else ''}"
            if not reached:
                print(f"cannot reach the gateway at {url}: {reason} (is it running?)", file=sys.stderr)
                return 3
            now = time.monotonic()
            if lost_since is None:
                lost_since = now
                print(f"lost the gateway at {url}: {reason}; retrying for {_RECONNECT_S:.0f} s", file=sys.stderr)
            elif now - lost_since >= _RECONNECT_S:
                print(f"gave up on the gateway at {url}: {reason}", file=sys.stderr)
                return 3
            time.sleep(1)
            continue
        reached = True
        if lost_since is not None:
            lost_since = None
            print(f"the gateway at {url} answers again", file=sys.stderr)
        for item in points:
            point, ts = item["id"], item.get("ts")
            if ts is None or seen.get(point) == ts or not _matches(point, patterns):
                continue
            seen[point] = ts
            from gateway.model import Quality

            quality = Quality[item.get("quality", "GOOD").upper()]
            print(_format_sample(Sample(point, item.get("value"), ts, quality), item.get("unit")), flush=True)
        time.sleep(1)
    return 3 if lost_since is not None else 0


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="where the outbox and state live (default: a per-user state directory)")
    parser.add_argument("--duration", type=arguments.duration, help="stop cleanly after this long (90, 90s, 15min, 2h)")
    parser.add_argument("--http", help="status page address HOST:PORT, or 'off' (default: the site's http.listen)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run the gateway for a site file")
    run.add_argument("site", help="site file (YAML)")
    _add_run_options(run)
    run.set_defaults(handler=cmd_run)

    demo = sub.add_parser("demo", help="run the demo building (simulated devices, local store, status page)")
    _add_run_options(demo)
    demo.set_defaults(handler=cmd_demo)

    check = sub.add_parser("check", help="validate site files, their device profiles and rule files")
    check.add_argument("sites", nargs="+", type=Path, metavar="SITE")
    check.add_argument("--strict", action="store_true", help="treat warnings (a literal secret in a file) as errors")
    check.add_argument("--data-dir", help="check as `run --data-dir DIR` would start (keys beside the ledger)")
    check.add_argument("--http", help="check as `run --http HOST:PORT|off` would start")
    check.set_defaults(handler=cmd_check)

    tail = sub.add_parser("tail", help="print live samples of a running gateway (or of the demo)")
    tail.add_argument("points", nargs="*", help="glob patterns of point ids (default: all)")
    source = tail.add_mutually_exclusive_group()
    source.add_argument(
        "--url", type=arguments.gateway_url, help=f"the gateway's status address (default {_DEFAULT_URL})"
    )
    source.add_argument("--demo", action="store_true", help="run the demo in-process and print its samples")
    tail.add_argument("--data-dir", help="with --demo: where its store lives (default: a temporary directory)")
    tail.add_argument("--token-file", help="file holding the access token (default: $EDGE_GATEWAY_TOKEN)")
    tail.add_argument("--duration", type=arguments.duration, help="stop after this long (90, 90s, 15min, 2h)")
    tail.set_defaults(handler=cmd_tail, usage=tail)
