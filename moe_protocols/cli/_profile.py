"""The ``moe-protocols profile`` command: record a model's expert load, plan and save a placement.

The library functions it is built from (:func:`~moe_protocols.profiling.record_expert_load`,
:func:`~moe_protocols.profiling.plan_placement`) live in :mod:`moe_protocols.profiling`;
this module and :mod:`._profile_run` are only the command line around them.
Every option is checked here before the model is built (the default model
takes seconds to build); what can only be checked against the model (the
expert count) is checked by :mod:`._profile_run` before any batch is recorded.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Final

from moe_protocols.cli._command import Command
from moe_protocols.cli._exit import EXIT_LOAD_ERROR, EXIT_USAGE
from moe_protocols.cli._target import TargetLoadError, describe_exception, load_target
from moe_protocols.cli._types import at_least, policy_problem, target_argument, writable_file

if TYPE_CHECKING:
    from typing import TextIO

__all__ = [
    "DEFAULT_MODEL_DESCRIPTION",
    "PROFILE_COMMAND",
    "PROFILE_DESCRIPTION",
    "add_profile_arguments",
    "run_profile",
]

DEFAULT_MODEL_DESCRIPTION: Final = (
    "a tiny randomly initialised Qwen3-MoE built offline with transformers (needs the 'hf' extra)"
)

PROFILE_DESCRIPTION: Final = (
    "Run random token batches through a model (MODULE:ATTR, a factory is called with no "
    "arguments; default: a tiny Qwen3-MoE), record how many token-expert assignments each "
    "expert of each MoE layer received, plan a placement of the experts over the EP ranks "
    "of a target deployment with a rebalancing policy, and print per layer the load skew "
    "and the balancedness of the naive and the planned placement; --save writes the "
    "placement for `EplbState.from_mapping` or `setup_eplb_from_mapping`. Exit 0 on "
    "success, 1 when the model is not (and wraps no) MixtureOfExperts, 2 on bad options, "
    "3 when the model cannot be imported or built."
)


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``moe-protocols profile`` arguments to ``parser``."""
    parser.add_argument(
        "target",
        nargs="?",
        default=None,
        type=target_argument,
        metavar="MODULE:ATTR",
        help=f"model factory or object (default: {DEFAULT_MODEL_DESCRIPTION})",
    )
    parser.add_argument(
        "--ranks", type=at_least(1), default=4, help="EP ranks to plan for (default 4)"
    )
    parser.add_argument(
        "--nodes",
        type=at_least(1),
        default=1,
        help="nodes the ranks span; divides --ranks (default 1)",
    )
    parser.add_argument(
        "--redundant",
        type=at_least(0),
        default=0,
        help="redundant expert slots per layer; experts + redundant must be a multiple of "
        "--ranks (default 0)",
    )
    parser.add_argument(
        "--groups",
        type=at_least(1),
        default=None,
        help="expert groups for hierarchical placement; divides the model's experts "
        "(default: the model's)",
    )
    parser.add_argument("--policy", default="deepseek", help="placement policy (default deepseek)")
    parser.add_argument(
        "--tokens", type=at_least(1), default=256, help="tokens per batch (default 256)"
    )
    parser.add_argument(
        "--batches", type=at_least(1), default=4, help="batches to record (default 4)"
    )
    parser.add_argument(
        "--vocab-size",
        type=at_least(1),
        default=None,
        help="draw token ids from [0, N) (default: the model's vocabulary, read from "
        "get_input_embeddings() or config.vocab_size)",
    )
    parser.add_argument(
        "--seed", type=at_least(0), default=0, help="seed of the random token ids (default 0)"
    )
    parser.add_argument(
        "--save",
        type=writable_file(".json", ".safetensors"),
        default=None,
        metavar="PATH",
        help="write the placement (.json or .safetensors)",
    )


def _deployment_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the deployment flags alone (before the model is built)."""
    if args.ranks % args.nodes != 0:
        return f"--ranks {args.ranks} is not a multiple of --nodes {args.nodes}"
    return policy_problem(args.policy)


def run_profile(args: argparse.Namespace, out: TextIO) -> int:
    """``moe-protocols profile``: record expert load, plan a placement, print (and save) it.

    Exit codes: 0 success; 1 no MixtureOfExperts in the model; 2 bad
    options (checked before the model is built, or against its expert
    count before recording); 3 the model could not be built (e.g.
    transformers is missing for the default model).
    """
    problem = _deployment_problem(args)
    if problem is not None:
        print(f"moe-protocols profile: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        model = _build(args.target)
    except TargetLoadError as exc:
        print(f"moe-protocols profile: {exc}", file=sys.stderr)
        return EXIT_LOAD_ERROR
    # Imported here, not at the top: profiling imports torch, which --help must not wait for.
    from moe_protocols.cli._profile_run import profile_model

    return profile_model(args, model, out)


def _build(spec: str | None) -> object:
    """The model ``spec`` names, or the default model when it names none."""
    if spec is not None:
        return load_target(spec)
    try:
        # Imported here, not at the top: the models import torch, which --help must not wait for.
        from moe_protocols.models import tiny_qwen3_moe

        return tiny_qwen3_moe()
    except Exception as exc:
        raise TargetLoadError(
            f"building the default model ({DEFAULT_MODEL_DESCRIPTION}) failed: "
            f"{describe_exception(exc)}"
        ) from exc


PROFILE_COMMAND: Final = Command(
    name="profile",
    help="record per-expert load of a model and plan a placement for a deployment",
    description=PROFILE_DESCRIPTION,
    add_arguments=add_profile_arguments,
    run=run_profile,
)
