"""The ``moe-protocols demo --plot`` figure: balancedness per step, per-rank load (matplotlib)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moe_protocols._torch_typed import float_list

if TYPE_CHECKING:
    from pathlib import Path

    from matplotlib.figure import Figure

    from moe_protocols.cli._demo_run import DemoReport

__all__ = ["demo_figure", "plot_demo"]


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
