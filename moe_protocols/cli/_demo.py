"""The ``moe-protocols demo`` command: serve the tiny VLM-wrapped MoE model with EPLB on.

The scenario itself is :mod:`._demo_run` (and its figure :mod:`._demo_plot`);
this module checks the options first, since building the model takes seconds.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import TYPE_CHECKING, Final

from moe_protocols.cli._command import Command
from moe_protocols.cli._exit import EXIT_LOAD_ERROR, EXIT_NOT_MOE, EXIT_OK, EXIT_USAGE
from moe_protocols.cli._types import (
    at_least,
    finite_at_least,
    policy_problem,
    slots_problem,
    writable_file,
)

if TYPE_CHECKING:
    from pathlib import Path
    from typing import TextIO

__all__ = ["DEMO_COMMAND", "add_demo_arguments", "run_demo_command"]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` arguments to the command's ``parser``."""
    parser.add_argument("--steps", type=at_least(1), default=48, help="engine steps (default 48)")
    parser.add_argument(
        "--experts", type=at_least(2), default=16, help="logical experts (default 16)"
    )
    parser.add_argument(
        "--redundant",
        type=at_least(0),
        default=4,
        help="redundant expert slots; experts + redundant must be a multiple of --ranks "
        "(default 4)",
    )
    parser.add_argument(
        "--ranks",
        type=at_least(1),
        default=4,
        help="EP ranks to plan for, simulated here (default 4)",
    )
    parser.add_argument(
        "--window", type=at_least(1), default=8, help="load window in steps (default 8)"
    )
    parser.add_argument(
        "--interval",
        type=at_least(1),
        default=10,
        help="steps between rearrangements (default 10)",
    )
    parser.add_argument(
        "--zipf",
        type=finite_at_least(0.0),
        default=1.2,
        help="Zipf exponent of the token stream: 0 is uniform, larger is more skewed (default 1.2)",
    )
    parser.add_argument(
        "--policy", default="deepseek", help="rebalancing policy (default deepseek)"
    )
    parser.add_argument("--seed", type=at_least(0), default=0, help="random seed (default 0)")
    parser.add_argument(
        "--threads",
        type=at_least(1),
        default=1,
        help="torch CPU threads; the tiny model runs fastest on one (default 1)",
    )
    parser.add_argument(
        "--plot",
        type=writable_file(".png", ".svg", ".pdf"),
        metavar="FILE",
        help="write a figure: balancedness per step with the rearrangements marked, and "
        "per-rank load of the first and last window with the ideal line",
    )


def _demo_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a combination of ``demo`` flags (each flag alone is already checked)."""
    experts = f"--experts {args.experts}"
    return slots_problem(experts, args.experts, args.redundant, args.ranks) or policy_problem(
        args.policy
    )


def run_demo_command(args: argparse.Namespace, out: TextIO) -> int:
    """``moe-protocols demo``: check the options, run the scenario, print (and plot) it."""
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
    # Imported here, not at the top: the scenario imports torch, which --help must not wait for.
    import torch

    from moe_protocols.cli import _demo_plot, _demo_run

    torch.set_num_threads(args.threads)
    options = _demo_run.DemoOptions(
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
    report = _demo_run.run_demo(options, out)
    if plot_path is not None:
        _demo_plot.plot_demo(report, plot_path)
        print(f"Wrote {plot_path}", file=out)
    return EXIT_OK if report.outputs_unchanged and report.verification.ok else EXIT_NOT_MOE


DEMO_COMMAND: Final = Command(
    name="demo",
    help="serve the tiny VLM-wrapped MoE model with EPLB on a skewed token stream",
    description=(
        "Load the built-in tiny vision-language model (its MoE language model sits behind "
        "get_language_model()) into the reference runner with EPLB enabled, feed it a "
        "Zipf-skewed token stream, and print the resolution trace, a progress bar, "
        "balancedness before/after every rearrangement and the slots moved. Exit 0 when the "
        "self-test (as verify) passed and the model's outputs stayed bit-identical, 1 if "
        "not, 2 on invalid options."
    ),
    add_arguments=add_demo_arguments,
    run=run_demo_command,
)
