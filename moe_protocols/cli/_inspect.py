"""The ``moe-protocols inspect`` command: how a model resolves, and its conformance report."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Final

from moe_protocols.cli._command import Command
from moe_protocols.cli._exit import EXIT_LOAD_ERROR, EXIT_NOT_MOE, EXIT_OK
from moe_protocols.cli._target import TargetLoadError, load_target, show_cause
from moe_protocols.cli._types import at_least, target_argument

if TYPE_CHECKING:
    from typing import TextIO

__all__ = ["INSPECT_COMMAND", "add_inspect_arguments", "run_inspect"]


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``inspect`` arguments to the command's ``parser``."""
    parser.add_argument(
        "target",
        metavar="MODULE:ATTR",
        type=target_argument,
        help="e.g. examples/wrapped_model.py:build or pkg.mod:fn",
    )
    parser.add_argument(
        "--max-depth",
        type=at_least(0),
        default=6,
        help="unwrapping depth limit, >= 0 (default 6); raise it when the trace says the "
        "limit was reached",
    )


def run_inspect(args: argparse.Namespace, out: TextIO) -> int:
    """``moe-protocols inspect``: print the resolution trace, conformance report and view."""
    # Imported here, not at the top: resolution imports torch, which --help must not wait for.
    from moe_protocols.adapters import MoEView
    from moe_protocols.conformance import check_conformance

    try:
        model = load_target(args.target)
    except TargetLoadError as exc:
        show_cause(exc, enabled=getattr(args, "traceback", False))
        print(f"moe-protocols inspect: {exc}", file=sys.stderr)
        return EXIT_LOAD_ERROR
    view = MoEView.resolve(model, max_depth=args.max_depth)
    if view is None:
        # require() builds the full explanation: the trace and every candidate's report.
        try:
            MoEView.require(model, max_depth=args.max_depth)
        except Exception as exc:
            print(str(exc), file=out)
        return EXIT_NOT_MOE
    print("Resolution trace:", file=out)
    print(_indent(str(view.trace)), file=out)
    print("", file=out)
    print("Conformance report:", file=out)
    path = view.trace.resolved_path or "model"
    print(_indent(str(check_conformance(view.model, path=path))), file=out)
    print("", file=out)
    print(repr(view), file=out)
    return EXIT_OK


def _indent(text: str) -> str:
    return "\n".join("  " + line if line else line for line in text.splitlines())


INSPECT_COMMAND: Final = Command(
    name="inspect",
    help="print how a model resolves to a MixtureOfExperts, and its conformance report",
    description=(
        "Build the model named by MODULE:ATTR (a factory is called with no arguments), "
        "walk its wrappers and print the resolution trace and conformance report. "
        "Exit 0 if a MixtureOfExperts was found, 1 if not, 3 if the model could not be built."
    ),
    add_arguments=add_inspect_arguments,
    run=run_inspect,
)
