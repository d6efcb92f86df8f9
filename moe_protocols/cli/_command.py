"""What the parser needs of a subcommand: its name, help, arguments and what runs it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple, TextIO

__all__ = ["Command"]


class Command(NamedTuple):
    """One subcommand of ``moe-protocols``.

    A NamedTuple rather than an attrs class: attrs would add a third to the
    start-up time of ``moe-protocols --help``.
    """

    name: str
    help: str
    """The one line ``moe-protocols --help`` lists it with."""
    description: str
    """The paragraph of ``moe-protocols <name> --help``, exit codes included."""
    add_arguments: Callable[[argparse.ArgumentParser], None]
    """Adds the command's own arguments to its parser."""
    run: Callable[[argparse.Namespace, TextIO], int]
    """Runs the command on the parsed arguments, printing to the stream; returns the exit code."""
