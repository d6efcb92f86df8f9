"""The seed scenario, end to end: a VLM-wrapped MoE model served with EPLB on.

``moe-protocols demo`` builds the tiny vision-language model (which does not
implement ``MixtureOfExperts``; its language model does), loads it into the
reference runner with EPLB enabled, and feeds it a skewed synthetic token
stream (token ids drawn from a Zipf law, so a few tokens and hence a few
experts are hot). It reports what a runner operator wants to see: how the
MoE model was found, balancedness before and after every rearrangement,
slots and bytes moved, and that the model's outputs did not change.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import attrs
import torch

from moe_protocols._torch_typed import float_list
from moe_protocols.eplb import BalancednessStats, EplbConfig
from moe_protocols.eplb._metrics import rank_loads_from_physical
from moe_protocols.models import tiny_vlm
from moe_protocols.runner import ReferenceRunner, RunnerConfig
from moe_protocols.verification import (
    VerificationReport,
    outputs_difference,
    verify_eplb_integration,
)

if TYPE_CHECKING:
    from pathlib import Path
    from typing import TextIO

    from matplotlib.figure import Figure

__all__ = [
    "DemoOptions",
    "DemoReport",
    "RearrangementLine",
    "demo_figure",
    "plot_demo",
    "run_demo",
]


@attrs.frozen
class DemoOptions:
    """Knobs of the demo; the defaults finish in a few seconds on one CPU core."""

    steps: int = attrs.field(default=48, validator=attrs.validators.ge(1))
    batch_size: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    seq_len: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    num_experts: int = attrs.field(default=16, validator=attrs.validators.ge(2))
    num_redundant_experts: int = attrs.field(default=4, validator=attrs.validators.ge(0))
    num_ranks: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    window_size: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    step_interval: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    zipf_exponent: float = attrs.field(default=1.2, validator=attrs.validators.ge(0.0))
    policy: str = "deepseek"
    seed: int = attrs.field(default=0, validator=attrs.validators.ge(0))


@attrs.frozen
class RearrangementLine:
    """One rearrangement as the demo saw it."""

    step: int
    balancedness_before: float
    balancedness_after: float
    slots_changed: int
    num_slots: int
    bytes_moved: int
    rank_load_before: torch.Tensor
    """``[ranks]`` load of the window before the rearranging step, summed over layers."""


@attrs.frozen
class DemoReport:
    """Everything the demo measured (the CLI prints it; tests assert on it)."""

    trace: str
    rearrangements: tuple[RearrangementLine, ...]
    first_window_balancedness: float
    last_window_balancedness: float
    rank_load_first: torch.Tensor
    rank_load_last: torch.Tensor
    step_balancedness: tuple[float, ...]
    """Per engine step: balancedness (mean over MoE layers of mean/max rank load) of that
    step's measured load, under the placement it ran on."""
    outputs_unchanged: bool
    verification: VerificationReport
    """The self-test run on the model before it was served (``moe-protocols verify``)."""


class _Progress:
    """A text progress bar: redrawn in place on a terminal, milestone lines otherwise."""

    def __init__(self, total: int, out: TextIO, width: int = 30) -> None:
        self._total, self._out, self._width = total, out, width
        self._tty = bool(getattr(out, "isatty", lambda: False)())
        self._last_decile = -1

    def update(self, done: int) -> None:
        filled = self._width * done // self._total
        bar = f"[{'#' * filled}{'.' * (self._width - filled)}] {done}/{self._total} steps"
        if self._tty:
            end = "\n" if done == self._total else ""
            print(f"\r{bar}", end=end, file=self._out, flush=True)
            return
        decile = 10 * done // self._total
        if decile != self._last_decile and (decile % 5 == 0 or done == self._total):
            self._last_decile = decile
            print(bar, file=self._out)

    def interrupt(self) -> None:
        """End the bar's line so other output starts on a fresh one."""
        if self._tty:
            print(file=self._out)


def _token_distribution(
    vocab_size: int, exponent: float, generator: torch.Generator
) -> torch.Tensor:
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    weights = ranks.pow(-exponent)
    return weights[torch.randperm(vocab_size, generator=generator)]


def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> DemoReport:
    """Serve the tiny VLM-wrapped MoE model with EPLB on a skewed stream; print, return figures."""
    model = tiny_vlm(
        num_experts=options.num_experts,
        num_redundant_experts=options.num_redundant_experts,
        seed=options.seed,
    )
    config = RunnerConfig(
        enable_eplb=True,
        eplb=EplbConfig(
            window_size=options.window_size,
            step_interval=options.step_interval,
            num_redundant_experts=options.num_redundant_experts,
            policy=options.policy,
        ),
        num_ranks=options.num_ranks,
    )
    # Before load_model: the self-test registers the model with a state of its own.
    verification = verify_eplb_integration(model, seed=options.seed)
    runner = ReferenceRunner(config)
    runner.load_model(model)
    view, state = runner.moe_view, runner.eplb_state
    # load_model with EPLB enabled either registered both or raised.
    assert view is not None
    assert state is not None
    print(f"Served model: {type(model).__name__} (not a MixtureOfExperts itself)", file=out)
    print("Resolution trace:", file=out)
    for trace_line in str(view.trace).splitlines():
        print(f"  {trace_line}", file=out)
    print(
        f"EPLB: {view.num_moe_layers} MoE layers, {view.num_logical_experts} logical experts in "
        f"{view.num_physical_experts} slots over {state.num_ranks} ranks "
        f"({view.num_redundant_experts} redundant), policy {state.policy.name!r}, "
        f"window {options.window_size}, rearrangement every {options.step_interval} steps",
        file=out,
    )
    print(f"Self-test (verify_eplb_integration): {verification.summary}", file=out)
    if not verification.ok:
        print(verification, file=out)

    generator = torch.Generator().manual_seed(options.seed)
    vocab = model.get_language_model().config.vocab_size
    token_probs = _token_distribution(vocab, options.zipf_exponent, generator)
    probe = torch.multinomial(
        token_probs, options.batch_size * options.seq_len, replacement=True, generator=generator
    ).view(options.batch_size, options.seq_len)
    with torch.no_grad():
        probe_before = model(probe)

    lines: list[RearrangementLine] = []
    step_balance: list[float] = []
    first_balance: float | None = None
    first_load: torch.Tensor | None = None
    progress = _Progress(options.steps, out)
    for step in range(1, options.steps + 1):
        ids = torch.multinomial(
            token_probs, options.batch_size * options.seq_len, replacement=True, generator=generator
        ).view(options.batch_size, options.seq_len)
        done_before = state.num_rearrangements
        # The window as it stands before this step: what the next rearrangement plans from.
        window_load = state.balancedness(config.model_name).rank_load.sum(dim=0)
        # execute_model() split in two, to read this step's load before the EPLB step folds
        # it into the window: forward, then the step.
        with torch.no_grad():
            model(ids)
        step_load = state.model_state(config.model_name).expert_load_pass
        step_balance.append(
            BalancednessStats.from_rank_load(
                config.model_name, rank_loads_from_physical(step_load, state.num_ranks).cpu()
            ).overall
        )
        runner.eplb_step()
        if state.num_rearrangements > done_before:
            result = state.last_rearrangement
            assert result is not None
            summary = result[config.model_name]
            rank_load = window_load
            if first_balance is None:
                first_balance, first_load = summary.overall_balancedness_before, rank_load
            line = RearrangementLine(
                step=step,
                balancedness_before=summary.overall_balancedness_before,
                balancedness_after=summary.overall_balancedness_after,
                slots_changed=summary.slots_changed,
                num_slots=summary.old_physical_to_logical_map.numel(),
                bytes_moved=summary.bytes_moved,
                rank_load_before=rank_load,
            )
            lines.append(line)
            progress.interrupt()
            print(
                f"step {step:4d}: rearranged: balancedness {line.balancedness_before:.3f} -> "
                f"{line.balancedness_after:.3f} (planned), {line.slots_changed}/{line.num_slots} "
                f"slots moved, {line.bytes_moved / 2**20:.2f} MiB",
                file=out,
            )
        progress.update(step)

    stats = state.balancedness(config.model_name)
    if stats.total_load > 0:
        last_balance, last_load = stats.overall, stats.rank_load.sum(dim=0)
    elif lines:
        # The run ended on a rearrangement, which clears the window: the last
        # measured window is the one that rearrangement planned from.
        last_balance, last_load = lines[-1].balancedness_before, lines[-1].rank_load_before
    else:
        last_balance, last_load = stats.overall, stats.rank_load.sum(dim=0)
    with torch.no_grad():
        probe_after = model(probe)
    difference = outputs_difference(probe_before, probe_after, exact=True)
    unchanged = difference is None
    if first_balance is None or first_load is None:
        first_balance, first_load = last_balance, last_load
    print(
        f"Balancedness (mean/max rank load, measured): first window {first_balance:.3f}, "
        f"last window {last_balance:.3f} (after {len(lines)} rearrangements)",
        file=out,
    )
    print(
        "Outputs for a fixed probe batch: "
        + (
            "bit-identical before and after"
            if difference is None
            else f"CHANGED (this is a bug): {difference}"
        ),
        file=out,
    )
    return DemoReport(
        trace=str(view.trace),
        rearrangements=tuple(lines),
        first_window_balancedness=first_balance,
        last_window_balancedness=last_balance,
        rank_load_first=first_load,
        rank_load_last=last_load,
        step_balancedness=tuple(step_balance),
        outputs_unchanged=unchanged,
        verification=verification,
    )


def _bar_balancedness(rank_load: torch.Tensor) -> float:
    """mean / max of the bars as drawn (rank load summed over layers)."""
    top = float(rank_load.max())
    return float(rank_load.double().mean()) / top if top > 0 else float("nan")


def plot_demo(report: DemoReport, path: Path) -> None:
    """Write :func:`demo_figure` to ``path`` (needs matplotlib); the format follows the suffix."""
    import matplotlib.pyplot as plt

    fig = demo_figure(report)
    try:
        fig.savefig(path, dpi=110)  # pyright: ignore[reportUnknownMemberType]  # matplotlib's stub
    finally:
        plt.close(fig)


def demo_figure(report: DemoReport) -> Figure:
    """The demo's figure (needs matplotlib), two panels.

    Top: balancedness of every step's load, with the rearrangements marked.
    Bottom: per-rank load of the first and the last window, summed over the
    MoE layers, with the ideal (every rank at the mean) drawn as a line; the
    legend's balancedness is that of the bars drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.5))
    steps = list(range(1, len(report.step_balancedness) + 1))
    top.plot(steps, list(report.step_balancedness), color="tab:blue", label="per step")
    for index, line in enumerate(report.rearrangements):
        top.axvline(
            line.step,
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label="rearrangement" if index == 0 else None,
        )
    top.set_ylim(0.0, 1.05)
    top.set_xlabel("engine step")
    top.set_ylabel("balancedness (mean/max rank load)")
    top.set_title("Balancedness per step (mean over MoE layers; 1.0 = perfectly even)")
    top.legend(loc="lower right")

    ranks = torch.arange(report.rank_load_first.numel(), dtype=torch.float64)
    width = 0.4
    first, last = report.rank_load_first, report.rank_load_last
    bottom.bar(
        float_list(ranks - width / 2),
        float_list(first.double()),
        width,
        label=f"first window (balancedness {_bar_balancedness(first):.2f})",
    )
    bottom.bar(
        float_list(ranks + width / 2),
        float_list(last.double()),
        width,
        label=f"last window (balancedness {_bar_balancedness(last):.2f})",
    )
    for load, color in ((first, "tab:blue"), (last, "tab:orange")):
        bottom.axhline(float(load.double().mean()), color=color, linestyle=":", linewidth=1.5)
    bottom.plot([], [], color="gray", linestyle=":", label="ideal (every rank at the mean)")
    bottom.set_xlabel("EP rank")
    bottom.set_ylabel("token-expert assignments")
    bottom.set_title("Per-rank load, summed over the MoE layers")
    bottom.set_xticks(float_list(ranks))
    bottom.set_ylim(0, 1.3 * float(torch.maximum(first.max(), last.max())))
    bottom.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig
