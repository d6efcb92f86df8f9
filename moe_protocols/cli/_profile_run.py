"""What ``moe-protocols profile`` runs once the model is built: check, record, plan, print, save.

Kept apart from :mod:`._profile` because it imports torch and the model
adapters, which ``moe-protocols --help`` must not wait for.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

from moe_protocols import profiling
from moe_protocols.adapters import MoEView
from moe_protocols.cli._exit import EXIT_NOT_MOE, EXIT_OK, EXIT_USAGE
from moe_protocols.cli._types import slots_problem
from moe_protocols.eplb import save_placement
from moe_protocols.errors import (
    EplbConfigError,
    EplbStateError,
    MoEProtocolsError,
    NotMixtureOfExpertsError,
    PolicyError,
)

if TYPE_CHECKING:
    import argparse
    from pathlib import Path
    from typing import TextIO

__all__ = ["profile_model"]


def profile_model(args: argparse.Namespace, model: object, out: TextIO) -> int:
    """Check the flags against ``model``, record its load, plan, print and save the placement.

    Returns the exit code of ``moe-protocols profile`` (see :func:`._profile.run_profile`).
    """
    err = sys.stderr
    try:
        view = MoEView.require(model)
    except NotMixtureOfExpertsError as exc:
        print(str(exc), file=out)
        return EXIT_NOT_MOE
    problem = _model_problem(args, view)
    if problem is not None:
        print(f"moe-protocols profile: {problem}", file=err)
        return EXIT_USAGE
    vocab = (
        args.vocab_size or profiling.vocabulary_size(model) or profiling.vocabulary_size(view.model)
    )
    if vocab is None:
        print(
            f"moe-protocols profile: cannot tell the vocabulary size of {type(model).__name__} "
            "(no get_input_embeddings() or config.vocab_size) to draw token ids; "
            "pass --vocab-size N",
            file=err,
        )
        return EXIT_USAGE
    batches = _batches(args, view, vocab)
    try:
        # Through the module, not a name bound at import: a substitute put there is seen.
        load = profiling.record_expert_load(
            model, batches, view=view, progress=_Progress(args.batches, err)
        )
    except EplbStateError as exc:
        print(f"moe-protocols profile: recording failed: {exc}", file=err)
        return EXIT_NOT_MOE
    try:
        plan = _plan(args, model, view, load)
    except (EplbConfigError, PolicyError) as exc:
        print(f"moe-protocols profile: {exc}", file=err)
        return EXIT_USAGE
    _print_plan(args, model, view, plan, out)
    return EXIT_OK if args.save is None else _save(plan, args.save, out)


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


def _batches(args: argparse.Namespace, view: MoEView, vocab: int) -> list[torch.Tensor]:
    """``--batches`` random ``[1, --tokens]`` batches of token ids below ``vocab``, seeded."""
    generator = torch.Generator().manual_seed(args.seed)
    device = profiling.weights_device(view)
    return [
        torch.randint(0, vocab, (1, args.tokens), generator=generator).to(device)
        for _ in range(args.batches)
    ]


def _plan(
    args: argparse.Namespace, model: object, view: MoEView, load: torch.Tensor
) -> profiling.PlacementPlan:
    """The placement the flags ask for, planned from ``load``."""
    groups = args.groups if args.groups is not None else view.num_expert_groups
    return profiling.plan_placement(
        load,
        num_ranks=args.ranks,
        num_nodes=args.nodes,
        num_redundant_experts=args.redundant,
        num_groups=groups,
        policy=args.policy,
        metadata={"model": type(model).__name__, "source": "moe-protocols profile"},
    )


def _print_plan(
    args: argparse.Namespace,
    model: object,
    view: MoEView,
    plan: profiling.PlacementPlan,
    out: TextIO,
) -> None:
    """Print what was profiled, the plan's table and the balancedness it reaches."""
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


def _save(plan: profiling.PlacementPlan, path: Path, out: TextIO) -> int:
    """Write the plan's placement to ``path``; the exit code (2 when it cannot be written)."""
    try:
        save_placement(plan.placement, path)
    except (MoEProtocolsError, OSError) as exc:
        print(f"moe-protocols profile: cannot save to {path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"saved placement to {path}", file=out)
    return EXIT_OK
