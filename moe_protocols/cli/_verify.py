"""The ``moe-protocols verify`` command: self-test a model's EPLB integration."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Final

from moe_protocols.cli._command import Command
from moe_protocols.cli._exit import EXIT_LOAD_ERROR, EXIT_NOT_MOE, EXIT_OK, EXIT_USAGE
from moe_protocols.cli._target import TargetLoadError, load_target, show_cause
from moe_protocols.cli._types import at_least, target_argument
from moe_protocols.errors import VerificationInputError

if TYPE_CHECKING:
    from typing import TextIO

__all__ = ["VERIFY_COMMAND", "add_verify_arguments", "run_verify"]


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``verify`` arguments to the command's ``parser``."""
    parser.add_argument(
        "target",
        metavar="MODULE:ATTR",
        type=target_argument,
        help="the model, e.g. moe_protocols.models:tiny_vlm or examples/wrapped_model.py:build",
    )
    parser.add_argument(
        "--inputs",
        metavar="MODULE:ATTR",
        type=target_argument,
        help="sample inputs (input_ids, or a mapping of forward keywords; a factory is called); "
        "default: token ids drawn from the model's vocabulary",
    )
    exactness = parser.add_mutually_exclusive_group()
    exactness.add_argument(
        "--exact",
        dest="exact",
        action="store_const",
        const=True,
        default=None,
        help="demand bit-identical outputs after moves (default: when two identical forwards are)",
    )
    exactness.add_argument(
        "--tolerant",
        dest="exact",
        action="store_const",
        const=False,
        help="compare outputs with the dtype's allclose tolerance",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--max-depth", type=at_least(0), default=6, help="unwrapping depth limit, >= 0 (default 6)"
    )


def run_verify(args: argparse.Namespace, out: TextIO) -> int:
    """``moe-protocols verify``: build the model (and inputs), run the self-test, print it."""
    # Imported here, not at the top: the self-test imports torch, which --help must not wait for.
    from moe_protocols.verification import is_sample_batch, verify_eplb_integration

    try:
        model = load_target(args.target)
        inputs = None if args.inputs is None else load_target(args.inputs)
    except TargetLoadError as exc:
        show_cause(exc, enabled=getattr(args, "traceback", False))
        print(f"moe-protocols verify: {exc}", file=sys.stderr)
        return EXIT_LOAD_ERROR
    if inputs is not None and not is_sample_batch(inputs):
        print(
            f"moe-protocols verify: --inputs {args.inputs} gave a {type(inputs).__name__}; "
            "expected a tensor of input_ids or a mapping of forward keyword arguments",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        report = verify_eplb_integration(
            model, inputs, exact=args.exact, seed=args.seed, max_depth=args.max_depth
        )
    except VerificationInputError as exc:
        print(f"moe-protocols verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(report, file=out)
    return EXIT_OK if report.ok else EXIT_NOT_MOE


VERIFY_COMMAND: Final = Command(
    name="verify",
    help="self-test a model's EPLB integration: load recording, replicas, moves, restore",
    description=(
        "Build the model named by MODULE:ATTR, register it with a private EPLB state and "
        "check that every MoE layer records tokens x top_k, that redundant slots are "
        "replicas, and that forced expert moves leave the outputs unchanged; the model is "
        "returned to its placement afterwards. Exit 0 when every check holds (skips "
        "allowed), 1 when one fails, 2 on bad usage (no inputs can be made, bad options), "
        "3 when the model or the inputs cannot be imported or built."
    ),
    add_arguments=add_verify_arguments,
    run=run_verify,
)
