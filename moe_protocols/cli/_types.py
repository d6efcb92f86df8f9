"""Checks of the command line's options: bad values are usage errors (exit 2).

The argparse ``type=`` converters reject a value while the arguments are
parsed, before any model is built, with a message that argparse prefixes with
the flag's name; the ``*_problem`` functions check what involves several
flags, for the commands to report before their work starts. This module
imports nothing heavy at import time, so ``moe-protocols --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from moe_protocols.cli._target import split_target

__all__ = [
    "at_least",
    "finite_at_least",
    "policy_problem",
    "slots_problem",
    "target_argument",
    "writable_file",
]


def at_least(minimum: int) -> Callable[[str], int]:
    """A converter to an int ``>= minimum``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}")
        return value

    convert.__name__ = f"int >= {minimum}"  # what argparse shows in 'invalid ... value'
    return convert


def finite_at_least(minimum: float) -> Callable[[str], float]:
    """A converter to a finite float ``>= minimum``."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a number >= {minimum:g}, got {text!r}")
        return value

    convert.__name__ = f"number >= {minimum:g}"
    return convert


def target_argument(spec: str) -> str:
    """A ``MODULE:ATTR`` spec, checked for shape only (importing it comes later)."""
    try:
        split_target(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


def writable_file(*suffixes: str) -> Callable[[str], Path]:
    """A converter to a file path whose folder exists (and, if given, with one of ``suffixes``)."""

    def convert(text: str) -> Path:
        path = Path(text)
        if suffixes and path.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(
                f"{text!r} must end in {' or '.join(suffixes)}, got {path.suffix or 'no suffix'!r}"
            )
        if not path.parent.is_dir():
            raise argparse.ArgumentTypeError(
                f"no folder {str(path.parent)!r} to write {text!r} into"
            )
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
        return path

    convert.__name__ = "file"
    return convert


def policy_problem(policy: str) -> str | None:
    """Why ``--policy`` names no registered policy; None when it names one."""
    # Imported here, not at the top: the engine imports torch, which --help must not wait for.
    from moe_protocols.eplb import DEFAULT_POLICIES

    if policy in DEFAULT_POLICIES:
        return None
    known = ", ".join(DEFAULT_POLICIES.names)
    return f"--policy {policy!r} is not a registered policy (known: {known})"


def slots_problem(experts: str, num_experts: int, redundant: int, ranks: int) -> str | None:
    """Why ``num_experts + --redundant`` slots do not split over ``--ranks``; None when they do.

    ``experts`` says where the expert count came from (``"--experts 16"``,
    ``"the model's 8 experts"``).
    """
    slots = num_experts + redundant
    if slots % ranks == 0:
        return None
    return (
        f"{experts} + --redundant {redundant} = {slots} slots do not split evenly over "
        f"--ranks {ranks} (every rank holds as many slots of each layer); choose --redundant "
        f"so that {num_experts} + redundant is a multiple of {ranks}"
    )
