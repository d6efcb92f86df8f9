"""The ``moe-protocols profile`` command: record a model's expert load, plan and save a placement.

The library functions it is built from (:func:`~moe_protocols.profiling.record_expert_load`,
:func:`~moe_protocols.profiling.plan_placement`) live in :mod:`moe_protocols.profiling`;
this module is only the command line around them. Every option is checked
before the model is built (the default model takes seconds to build), and
what can only be checked against the model (the expert count) is checked
before any batch is recorded.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Final

from moe_protocols._cli_types import (
    at_least,
    policy_problem,
    slots_problem,
    target_argument,
    writable_file,
)
from moe_protocols._target import TargetLoadError, describe_exception, load_target

if TYPE_CHECKING:
    import argparse
    from typing import TextIO

    from moe_protocols.adapters._view import MoEView

__all__ = ["DEFAULT_MODEL_DESCRIPTION", "add_profile_arguments", "run_profile"]

EXIT_OK: Final = 0
EXIT_NOT_MOE: Final = 1
EXIT_USAGE: Final = 2
EXIT_LOAD_ERROR: Final = 3

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


def _model_problem(args: argparse.Namespace, view: MoEView) -> str | None:
    """What is wrong with the flags given the model's counts (before any batch is recorded)."""
    experts = view.num_logical_experts
    problem = slots_problem(f"the model's {experts} experts", experts, args.redundant, args.ranks)
    if problem is None and args.groups is not None and experts % args.groups != 0:
        problem = f"--groups {args.groups} does not divide the model's {experts} experts"
    return problem


class _Progress:
    """``recording batch i/N`` on stderr: redrawn in place on a terminal, one line otherwise."""

    def __init__(self, total: int, err: TextIO) -> None:
        self._total, self._err = total, err
        self._tty = bool(getattr(err, "isatty", lambda: False)())

    def __call__(self, done: int) -> None:
        text = f"recording batch {done}/{self._total}"
        if self._tty:
            print(f"\r{text}", end="\n" if done == self._total else "", file=self._err, flush=True)
        elif done == self._total:
            print(text, file=self._err)


def run_profile(args: argparse.Namespace, out: TextIO) -> int:
    """``moe-protocols profile``: record expert load, plan a placement, print (and save) it.

    Exit codes: 0 success; 1 no MixtureOfExperts in the model; 2 bad
    options (checked before the model is built, or against its expert
    count before recording); 3 the model could not be built (e.g.
    transformers is missing for the default model).
    """
    err = sys.stderr
    problem = _deployment_problem(args)
    if problem is not None:
        print(f"moe-protocols profile: {problem}", file=err)
        return EXIT_USAGE
    import torch

    from moe_protocols.adapters._view import MoEView
    from moe_protocols.eplb._mapping_io import save_placement
    from moe_protocols.errors import (
        EplbConfigError,
        EplbStateError,
        MoEProtocolsError,
        NotMixtureOfExpertsError,
        PolicyError,
    )
    from moe_protocols.profiling import (
        plan_placement,
        record_expert_load,
        vocabulary_size,
        weights_device,
    )

    try:
        model = _build(args.target)
    except TargetLoadError as exc:
        print(f"moe-protocols profile: {exc}", file=err)
        return EXIT_LOAD_ERROR
    try:
        view = MoEView.require(model)
    except NotMixtureOfExpertsError as exc:
        print(str(exc), file=out)
        return EXIT_NOT_MOE
    problem = _model_problem(args, view)
    if problem is not None:
        print(f"moe-protocols profile: {problem}", file=err)
        return EXIT_USAGE
    vocab = args.vocab_size or vocabulary_size(model) or vocabulary_size(view.model)
    if vocab is None:
        print(
            f"moe-protocols profile: cannot tell the vocabulary size of {type(model).__name__} "
            "(no get_input_embeddings() or config.vocab_size) to draw token ids; "
            "pass --vocab-size N",
            file=err,
        )
        return EXIT_USAGE
    generator = torch.Generator().manual_seed(args.seed)
    device = weights_device(view)
    batches = [
        torch.randint(0, vocab, (1, args.tokens), generator=generator).to(device)
        for _ in range(args.batches)
    ]
    try:
        load = record_expert_load(model, batches, view=view, progress=_Progress(args.batches, err))
    except EplbStateError as exc:
        print(f"moe-protocols profile: recording failed: {exc}", file=err)
        return EXIT_NOT_MOE
    groups = args.groups if args.groups is not None else view.num_expert_groups
    try:
        plan = plan_placement(
            load,
            num_ranks=args.ranks,
            num_nodes=args.nodes,
            num_redundant_experts=args.redundant,
            num_groups=groups,
            policy=args.policy,
            metadata={"model": type(model).__name__, "source": "moe-protocols profile"},
        )
    except (EplbConfigError, PolicyError) as exc:
        print(f"moe-protocols profile: {exc}", file=err)
        return EXIT_USAGE
    print(
        f"model: {type(model).__name__}, MoE model at: {view.trace.resolved_path or 'model'}",
        file=out,
    )
    top_k = getattr(view, "top_k", None)
    per_token = f" (x top_k {top_k})" if isinstance(top_k, int) else ""
    print(
        f"MoE layers: {view.num_moe_layers}, experts: {view.num_logical_experts}, "
        f"groups: {view.num_expert_groups}; recorded {args.batches} batch(es) x "
        f"{args.tokens} tokens{per_token}",
        file=out,
    )
    print(str(plan), file=out)
    print(
        f"balancedness: naive {plan.naive_balancedness:.3f} -> planned {plan.balancedness:.3f}",
        file=out,
    )
    if args.save is not None:
        try:
            save_placement(plan.placement, args.save)
        except (MoEProtocolsError, OSError) as exc:
            print(f"moe-protocols profile: cannot save to {args.save}: {exc}", file=err)
            return EXIT_USAGE
        print(f"saved placement to {args.save}", file=out)
    return EXIT_OK


def _build(spec: str | None) -> object:
    if spec is not None:
        return load_target(spec)
    try:
        from moe_protocols.models._tiny_hf import tiny_qwen3_moe

        return tiny_qwen3_moe()
    except Exception as exc:
        raise TargetLoadError(
            f"building the default model ({DEFAULT_MODEL_DESCRIPTION}) failed: "
            f"{describe_exception(exc)}"
        ) from exc
