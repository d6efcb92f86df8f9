"""The parser of the ``moe-protocols`` command and its entry point.

Each command lives in its own module and is listed in :data:`COMMANDS`; the
exit codes are in :mod:`._exit`.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Final, TextIO

from moe_protocols import __version__
from moe_protocols.cli._command import Command
from moe_protocols.cli._demo import DEMO_COMMAND
from moe_protocols.cli._exit import EXIT_LOAD_ERROR
from moe_protocols.cli._inspect import INSPECT_COMMAND
from moe_protocols.cli._profile import PROFILE_COMMAND
from moe_protocols.cli._target import describe_exception
from moe_protocols.cli._verify import VERIFY_COMMAND

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: Final[tuple[Command, ...]] = (
    INSPECT_COMMAND,
    VERIFY_COMMAND,
    DEMO_COMMAND,
    PROFILE_COMMAND,
)
"""The subcommands, in the order ``moe-protocols --help`` lists them."""


def _version() -> str:
    """The installed distribution's version (the source tree's when run uninstalled)."""
    try:
        return version("moe-protocols")
    except PackageNotFoundError:
        return __version__


def build_parser(prog: str = "moe-protocols") -> argparse.ArgumentParser:
    """The argument parser of the ``moe-protocols`` command."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Find the Mixture-of-Experts model inside any wrapper and balance its experts.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="on an unexpected error, print the whole traceback instead of one line",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command_parser = sub.add_parser(
            command.name, help=command.help, description=command.description
        )
        command.add_arguments(command_parser)
        command_parser.set_defaults(handler=command.run)
    return parser


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, prog: str = "moe-protocols"
) -> int:
    """Run the command line; return the exit code."""
    args = build_parser(prog).parse_args(argv)
    handler: Callable[[argparse.Namespace, TextIO], int] = args.handler
    try:
        return handler(args, out if out is not None else sys.stdout)
    except KeyboardInterrupt:
        raise
    except (Exception, SystemExit) as exc:
        # Whatever user code or a bug raised: one line and the documented code, never a
        # traceback unless asked for (or an exit status that claims success).
        if args.traceback:
            traceback.print_exc()
        print(
            f"moe-protocols {args.command}: unexpected error: {describe_exception(exc)}"
            + ("" if args.traceback else " (rerun with --traceback for details)"),
            file=sys.stderr,
        )
        return EXIT_LOAD_ERROR
