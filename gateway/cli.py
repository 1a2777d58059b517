"""The ``edge-gateway`` command line.

Owns argument parsing and exit codes only; each command group lives beside the code it drives and registers itself
through a ``register(subparsers)`` function listed by ``command_groups()`` (the drivers' from their plugins; imported
lazily, so ``--help`` and ``check`` do not load protocol libraries they do not need).

The groups are imported in order only until one has registered the command word on the command line: ``run`` is a
core command, so a running gateway never imports ``incentives``'s key handling (cryptography, about 6 MiB RSS), the
rules tools or the drivers' sub-commands it does not use. ``--help``, no command or an unknown word imports every
group, so the help text and the "invalid choice" error list every command, as before.

Exit codes: 0 ok, 1 the input was wrong (config errors, verification failures), 2 usage error, 3 runtime failure.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

from gateway import __version__

#: modules that add sub-commands: each has ``register(subparsers) -> None``; the drivers' groups come from their
#: plugins (gateway/plugins.py) and sit between the core commands and the rest
_CORE_GROUPS = ("gateway.commands",)  # run, demo, check, tail
_LATER_GROUPS = (
    "rules.cli",  # rules check/test
    "gateway.incentives.cli",  # incentives verify, keys generate
    "gateway.http.cli",  # status
    "gateway.platform.cli",  # platform receive/report
)


def command_groups() -> Iterator[str]:
    """Every module that adds sub-commands, the installed drivers' (``modbus``, ``mqtt`` ...) included. The driver
    plugins (and their config models) are loaded only when the core groups did not hold the command."""
    yield from _CORE_GROUPS
    from gateway.plugins import plugins

    yield from (plugin.cli for plugin in plugins().drivers.values() if plugin.cli is not None)
    yield from _LATER_GROUPS


Handler = Callable[[argparse.Namespace], int]


class _WordFinder(argparse.ArgumentParser):
    """Reads only the global options and the command word; a problem is left for the real parser to report."""

    def error(self, message: str) -> NoReturn:
        raise argparse.ArgumentError(None, message)


def _command_word(argv: Sequence[str] | None) -> str | None:
    """The sub-command named on the command line, found without importing any group; None when there is none or
    the global options cannot be read (then every group is imported and argparse reports the problem)."""
    pre = _WordFinder(add_help=False, allow_abbrev=False)
    pre.add_argument("--log-level")
    pre.add_argument("--log-format")
    pre.add_argument("command", nargs="?")
    try:
        known, _rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    except argparse.ArgumentError:
        return None
    word = known.command
    return word if isinstance(word, str) and not word.startswith("-") else None


def build_parser(argv: Sequence[str] | None = None, *, every_group: bool = True) -> argparse.ArgumentParser:
    """The parser; with ``every_group=False`` only the groups up to the one that adds ``argv``'s command word."""
    command = None if every_group else _command_word(argv)
    parser = argparse.ArgumentParser(
        prog="edge-gateway",
        description="Smart-building IoT edge gateway: Modbus and MQTT in, local rules, InfluxDB and MQTT out.",
    )
    parser.add_argument("--version", action="version", version=f"edge-gateway {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in command_groups():
        importlib.import_module(module_name).register(sub)
        if command is not None and command in sub.choices:
            break  # the rest cannot change how this command parses (a later duplicate name would be refused)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the command, and map the two ways a user ends a command to Unix exit codes.

    Ctrl-C (SIGINT) anywhere, even while the commands are being imported, is 130 and no traceback. A closed
    pipe (``edge-gateway tail | head -2``) ends the command quietly with 0: ``head`` got what it asked for."""
    try:
        parser = build_parser(argv, every_group=False)
        args = parser.parse_args(argv)
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            return 2
        from gateway.logs import setup_logging

        setup_logging(level=args.log_level, fmt=args.log_format)
        code = handler(args)
        sys.stdout.flush()  # a pipe closed after the last print shows here, not in the interpreter's exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    # the reader has gone: what is still buffered cannot be written, and the interpreter's flush at exit must not
    # print "Exception ignored ... BrokenPipeError"
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout already closed or not a file
        pass
