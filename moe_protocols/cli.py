"""The ``moe-protocols`` command: inspect how a model resolves, verify it, run the EPLB demo.

Exit codes: 0 success; 1 the model is not (and wraps no) MixtureOfExperts, a
``verify`` check failed, or the demo saw outputs change; 2 bad usage
(argparse, invalid option values, ``verify`` without usable inputs); 3 the
model (or ``--inputs``) factory could not be loaded or built, or an optional
dependency (matplotlib for ``--plot``) is missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, TextIO

from moe_protocols._cli_profile import PROFILE_DESCRIPTION, add_profile_arguments, run_profile
from moe_protocols._cli_types import (
    at_least,
    finite_at_least,
    policy_problem,
    slots_problem,
    target_argument,
    writable_file,
)
from moe_protocols._target import TargetLoadError, describe_exception, load_target

__all__ = ["main"]

EXIT_OK: Final = 0
EXIT_NOT_MOE: Final = 1
EXIT_USAGE: Final = 2
EXIT_LOAD_ERROR: Final = 3


def _show_cause(args: argparse.Namespace, exc: BaseException) -> None:
    """With ``--traceback``, print the traceback of what made the load fail."""
    cause = exc.__cause__
    if getattr(args, "traceback", False) and cause is not None:
        traceback.print_exception(cause, file=sys.stderr)


def _version() -> str:
    """The installed distribution's version (the source tree's when run uninstalled)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moe-protocols")
    except PackageNotFoundError:
        from moe_protocols import __version__

        return __version__


def _inspect(args: argparse.Namespace, out: TextIO) -> int:
    from moe_protocols.adapters import MoEView
    from moe_protocols.conformance import check_conformance

    try:
        model = load_target(args.target)
    except TargetLoadError as exc:
        _show_cause(args, exc)
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


def _demo_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a combination of ``demo`` flags (each flag alone is already checked)."""
    experts = f"--experts {args.experts}"
    return slots_problem(experts, args.experts, args.redundant, args.ranks) or policy_problem(
        args.policy
    )


def _demo(args: argparse.Namespace, out: TextIO) -> int:
    plot_path: Path | None = args.plot
    if plot_path is not None:
        try:
            importlib.import_module("matplotlib")  # checked before the run, not after it
        except ImportError:
            print(
                "moe-protocols demo: --plot needs matplotlib: pip install 'moe-protocols[plot]'",
                file=sys.stderr,
            )
            return EXIT_LOAD_ERROR
    problem = _demo_problem(args)
    if problem is not None:
        print(f"moe-protocols demo: {problem}", file=sys.stderr)
        return EXIT_USAGE
    import torch

    from moe_protocols._demo import DemoOptions, plot_demo, run_demo

    torch.set_num_threads(args.threads)
    options = DemoOptions(
        steps=args.steps,
        num_experts=args.experts,
        num_redundant_experts=args.redundant,
        num_ranks=args.ranks,
        window_size=args.window,
        step_interval=args.interval,
        zipf_exponent=args.zipf,
        policy=args.policy,
        seed=args.seed,
    )
    report = run_demo(options, out)
    if plot_path is not None:
        plot_demo(report, plot_path)
        print(f"Wrote {plot_path}", file=out)
    return EXIT_OK if report.outputs_unchanged and report.verification.ok else EXIT_NOT_MOE


def _verify(args: argparse.Namespace, out: TextIO) -> int:
    from moe_protocols.errors import VerificationInputError
    from moe_protocols.verification import is_sample_batch, verify_eplb_integration

    try:
        model = load_target(args.target)
        inputs = None if args.inputs is None else load_target(args.inputs)
    except TargetLoadError as exc:
        _show_cause(args, exc)
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


def _indent(text: str) -> str:
    return "\n".join("  " + line if line else line for line in text.splitlines())


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
    p_inspect = sub.add_parser(
        "inspect",
        help="print how a model resolves to a MixtureOfExperts, and its conformance report",
        description=(
            "Build the model named by MODULE:ATTR (a factory is called with no arguments), "
            "walk its wrappers and print the resolution trace and conformance report. "
            "Exit 0 if a MixtureOfExperts was found, 1 if not, 3 if the model could not be built."
        ),
    )
    p_inspect.add_argument(
        "target",
        metavar="MODULE:ATTR",
        type=target_argument,
        help="e.g. examples/wrapped_model.py:build or pkg.mod:fn",
    )
    p_inspect.add_argument(
        "--max-depth",
        type=at_least(0),
        default=6,
        help="unwrapping depth limit, >= 0 (default 6); raise it when the trace says the "
        "limit was reached",
    )
    p_inspect.set_defaults(handler=_inspect)

    p_verify = sub.add_parser(
        "verify",
        help="self-test a model's EPLB integration: load recording, replicas, moves, restore",
        description=(
            "Build the model named by MODULE:ATTR, register it with a private EPLB state and "
            "check that every MoE layer records tokens x top_k, that redundant slots are "
            "replicas, and that forced expert moves leave the outputs unchanged; the model is "
            "returned to its placement afterwards. Exit 0 when every check holds (skips "
            "allowed), 1 when one fails, 2 on bad usage (no inputs can be made, bad options), "
            "3 when the model or the inputs cannot be imported or built."
        ),
    )
    p_verify.add_argument(
        "target",
        metavar="MODULE:ATTR",
        type=target_argument,
        help="the model, e.g. moe_protocols.models:tiny_vlm or examples/wrapped_model.py:build",
    )
    p_verify.add_argument(
        "--inputs",
        metavar="MODULE:ATTR",
        type=target_argument,
        help="sample inputs (input_ids, or a mapping of forward keywords; a factory is called); "
        "default: token ids drawn from the model's vocabulary",
    )
    exactness = p_verify.add_mutually_exclusive_group()
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
    p_verify.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p_verify.add_argument(
        "--max-depth", type=at_least(0), default=6, help="unwrapping depth limit, >= 0 (default 6)"
    )
    p_verify.set_defaults(handler=_verify)

    p_demo = sub.add_parser(
        "demo",
        help="serve the tiny VLM-wrapped MoE model with EPLB on a skewed token stream",
        description=(
            "Load the built-in tiny vision-language model (its MoE language model sits behind "
            "get_language_model()) into the reference runner with EPLB enabled, feed it a "
            "Zipf-skewed token stream, and print the resolution trace, a progress bar, "
            "balancedness before/after every rearrangement and the slots moved. Exit 0 when the "
            "self-test (as verify) passed and the model's outputs stayed bit-identical, 1 if "
            "not, 2 on invalid options."
        ),
    )
    p_demo.add_argument("--steps", type=at_least(1), default=48, help="engine steps (default 48)")
    p_demo.add_argument(
        "--experts", type=at_least(2), default=16, help="logical experts (default 16)"
    )
    p_demo.add_argument(
        "--redundant",
        type=at_least(0),
        default=4,
        help="redundant expert slots; experts + redundant must be a multiple of --ranks "
        "(default 4)",
    )
    p_demo.add_argument(
        "--ranks",
        type=at_least(1),
        default=4,
        help="EP ranks to plan for, simulated here (default 4)",
    )
    p_demo.add_argument(
        "--window", type=at_least(1), default=8, help="load window in steps (default 8)"
    )
    p_demo.add_argument(
        "--interval",
        type=at_least(1),
        default=10,
        help="steps between rearrangements (default 10)",
    )
    p_demo.add_argument(
        "--zipf",
        type=finite_at_least(0.0),
        default=1.2,
        help="Zipf exponent of the token stream: 0 is uniform, larger is more skewed (default 1.2)",
    )
    p_demo.add_argument(
        "--policy", default="deepseek", help="rebalancing policy (default deepseek)"
    )
    p_demo.add_argument("--seed", type=at_least(0), default=0, help="random seed (default 0)")
    p_demo.add_argument(
        "--threads",
        type=at_least(1),
        default=1,
        help="torch CPU threads; the tiny model runs fastest on one (default 1)",
    )
    p_demo.add_argument(
        "--plot",
        type=writable_file(".png", ".svg", ".pdf"),
        metavar="FILE",
        help="write a figure: balancedness per step with the rearrangements marked, and "
        "per-rank load of the first and last window with the ideal line",
    )
    p_demo.set_defaults(handler=_demo)

    p_profile = sub.add_parser(
        "profile",
        help="record per-expert load of a model and plan a placement for a deployment",
        description=PROFILE_DESCRIPTION,
    )
    add_profile_arguments(p_profile)
    p_profile.set_defaults(handler=run_profile)
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


if __name__ == "__main__":
    sys.exit(main())
