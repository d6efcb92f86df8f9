"""DeepSeek EPLB baseline vs the migration-aware policy, side by side, on every workload x shape.

Usage::

    python benchmarks/bench_policy.py [--quick] [--markdown PATH] [--plot PATH]

Prints (and with ``--markdown`` writes) tables of balancedness, the lower
bound, slots moved and policy time, and with ``--plot`` draws balancedness
against slots moved. Scenarios, per shape and load distribution:

* **fresh** - a plan without an old placement, on the window's loads.
* **drift** - each policy first plans window 0, then rebalances window 1
  (window 0 times lognormal(0.2) noise) from its own placement. Reported:
  balancedness on window 1 (planned), slots refetched, balancedness on
  window 2 (another 0.2 drift: what the plan *realises*), per-step
  balancedness on window 2 under sampling noise (8192 tokens x top-8 per
  step), and "hold" - window 1 on the unchanged window-0 placement.
* **heating** - 4 experts per layer heat up 1.5x per window over 4 windows,
  rebalanced every window.

Times are medians over repeated calls on one CPU thread (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch

from moe_protocols.eplb.analysis import (
    balancedness_bound,
    duplicate_replicas,
    migration_stats,
    realised_balancedness,
    sampled_balancedness,
)
from moe_protocols.eplb.policies import DeepSeekPolicy, MigrationAwarePolicy, RebalancePolicy
from moe_protocols.eplb.workloads import (
    DEEPSEEK_V3_288,
    DEEPSEEK_V3_320,
    QWEN3_235B,
    STANDARD_DISTRIBUTIONS,
    STANDARD_SHAPES,
    Drift,
    LoadDistribution,
    MoEShape,
    drift_sequence,
)

DRIFT = Drift("lognormal", 0.2)
HEATING = Drift("heating", 1.5, num_hot=4)
TOKENS_PER_STEP = 8192
TOP_K = 8


@attrs.frozen
class Plan:
    """One policy call: the placement and how long it took (median, ms)."""

    placement: torch.Tensor
    millis: float


def plan(
    policy: RebalancePolicy,
    shape: MoEShape,
    load: torch.Tensor,
    old: torch.Tensor | None,
    repeats: int,
) -> Plan:
    """Run ``policy`` ``repeats`` times on the same inputs; keep the result and the median time."""
    args = (shape.num_physical, shape.num_groups, shape.num_nodes, shape.num_ranks)
    placement = policy.rebalance_experts(load, *args, old)  # warm-up, and the result
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        policy.rebalance_experts(load, *args, old)
        times.append((time.perf_counter() - start) * 1e3)
    return Plan(placement, statistics.median(times))


def bal(placement: torch.Tensor, load: torch.Tensor, shape: MoEShape) -> float:
    return realised_balancedness(placement, load, shape.num_ranks)


def bound(load: torch.Tensor, shape: MoEShape) -> float:
    return float(
        balancedness_bound(
            load,
            shape.num_physical,
            shape.num_ranks,
            num_groups=shape.num_groups,
            num_nodes=shape.num_nodes,
            groups_on_nodes=shape.hierarchical,
        ).mean()
    )


@attrs.frozen
class FreshRow:
    shape: str
    workload: str
    local: bool
    bound: float
    base: float
    new: float
    base_ms: float
    new_ms: float
    base_duplicates: int
    new_duplicates: int


@attrs.frozen
class DriftRow:
    shape: str
    workload: str
    local: bool
    base: float
    new: float
    base_moved: float
    new_moved: float
    new_inter_node: float
    hold: float
    base_next: float
    new_next: float
    base_step: float
    new_step: float
    base_ms: float
    new_ms: float
    new_duplicates: int


@attrs.frozen
class SequenceRow:
    shape: str
    workload: str
    base: float
    new: float
    base_moved: float
    new_moved: float
    base_next: float
    new_next: float


def run_fresh(
    shape: MoEShape,
    dist: LoadDistribution,
    seed: int,
    repeats: int,
    policies: tuple[RebalancePolicy, RebalancePolicy],
) -> FreshRow:
    base_policy, new_policy = policies
    load = dist.sample(shape.num_layers, shape.num_logical, seed=seed)
    base = plan(base_policy, shape, load, None, repeats)
    new = plan(new_policy, shape, load, None, repeats)
    return FreshRow(
        shape=shape.name,
        workload=dist.name,
        local=shape.hierarchical,
        bound=bound(load, shape),
        base=bal(base.placement, load, shape),
        new=bal(new.placement, load, shape),
        base_ms=base.millis,
        new_ms=new.millis,
        base_duplicates=duplicate_replicas(base.placement, shape.num_ranks),
        new_duplicates=duplicate_replicas(new.placement, shape.num_ranks),
    )


def run_drift(
    shape: MoEShape,
    dist: LoadDistribution,
    seed: int,
    repeats: int,
    policies: tuple[RebalancePolicy, RebalancePolicy],
) -> DriftRow:
    base_policy, new_policy = policies
    windows = drift_sequence(
        dist.sample(shape.num_layers, shape.num_logical, seed=seed), DRIFT, 2, seed=seed + 1
    )
    now, later = windows[1], windows[2]
    args = (shape.num_physical, shape.num_groups, shape.num_nodes, shape.num_ranks)
    base_old = base_policy.rebalance_experts(windows[0], *args)
    new_old = new_policy.rebalance_experts(windows[0], *args)
    base = plan(base_policy, shape, now, base_old, repeats)
    new = plan(new_policy, shape, now, new_old, repeats)
    base_cost = migration_stats(
        base_old, base.placement, shape.num_ranks, num_nodes=shape.num_nodes
    )
    new_cost = migration_stats(new_old, new.placement, shape.num_ranks, num_nodes=shape.num_nodes)

    def per_step(placement: torch.Tensor) -> float:
        return sampled_balancedness(
            placement,
            later,
            shape.num_ranks,
            tokens_per_step=TOKENS_PER_STEP,
            top_k=TOP_K,
            num_steps=4,
            seed=seed + 2,
        )

    return DriftRow(
        shape=shape.name,
        workload=dist.name,
        local=shape.hierarchical,
        base=bal(base.placement, now, shape),
        new=bal(new.placement, now, shape),
        base_moved=base_cost.fraction,
        new_moved=new_cost.fraction,
        new_inter_node=new_cost.inter_node_slots / max(1, new_cost.slots_refetched),
        hold=bal(new_old, now, shape),
        base_next=bal(base.placement, later, shape),
        new_next=bal(new.placement, later, shape),
        base_step=per_step(base.placement),
        new_step=per_step(new.placement),
        base_ms=base.millis,
        new_ms=new.millis,
        new_duplicates=duplicate_replicas(new.placement, shape.num_ranks),
    )


def run_sequence(
    shape: MoEShape,
    dist: LoadDistribution,
    drift: Drift,
    windows: int,
    seed: int,
    policies: tuple[RebalancePolicy, RebalancePolicy],
) -> SequenceRow:
    loads = drift_sequence(
        dist.sample(shape.num_layers, shape.num_logical, seed=seed),
        drift,
        windows + 1,
        seed=seed + 1,
    )
    args = (shape.num_physical, shape.num_groups, shape.num_nodes, shape.num_ranks)
    results: list[tuple[float, float, float]] = []
    for policy in policies:
        placement = policy.rebalance_experts(loads[0], *args)
        planned: list[float] = []
        moved: list[float] = []
        realised: list[float] = []
        for window in range(1, windows + 1):
            new = policy.rebalance_experts(loads[window], *args, placement)
            moved.append(migration_stats(placement, new, shape.num_ranks).fraction)
            planned.append(bal(new, loads[window], shape))
            realised.append(bal(new, loads[window + 1], shape))
            placement = new
        results.append(
            (statistics.mean(planned), statistics.mean(moved), statistics.mean(realised))
        )
    (base_planned, base_moved, base_next), (new_planned, new_moved, new_next) = results
    return SequenceRow(
        shape=shape.name,
        workload=f"{dist.name}, {drift.name} x{windows}",
        base=base_planned,
        new=new_planned,
        base_moved=base_moved,
        new_moved=new_moved,
        base_next=base_next,
        new_next=new_next,
    )


def sweep(
    shape: MoEShape, dist: LoadDistribution, seed: int, tolerances: Sequence[float]
) -> list[tuple[str, float, float]]:
    """``(label, slots moved, balancedness)`` after a 0.2 drift: baseline, then each tolerance."""
    windows = drift_sequence(
        dist.sample(shape.num_layers, shape.num_logical, seed=seed), DRIFT, 1, seed=seed + 1
    )
    args = (shape.num_physical, shape.num_groups, shape.num_nodes, shape.num_ranks)
    points: list[tuple[str, float, float]] = []
    policies: list[tuple[str, RebalancePolicy]] = [("deepseek", DeepSeekPolicy())]
    policies += [(f"tolerance {t:g}", MigrationAwarePolicy(tolerance=t)) for t in tolerances]
    for label, policy in policies:
        old = policy.rebalance_experts(windows[0], *args)
        new = policy.rebalance_experts(windows[1], *args, old)
        cost = migration_stats(old, new, shape.num_ranks).fraction
        points.append((label, cost, bal(new, windows[1], shape)))
    return points


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def ratio(new: float, base: float) -> str:
    return f"{new / base:.3f}" if base > 0 else "-"


def fresh_table(rows: Sequence[FreshRow]) -> str:
    return table(
        [
            "shape",
            "loads",
            "node-local",
            "bound",
            "deepseek",
            "migration_aware",
            "ratio",
            "deepseek ms",
            "new ms",
            "time ratio",
            "dup. replicas (deepseek / new)",
        ],
        [
            [
                r.shape,
                r.workload,
                "yes" if r.local else "no",
                f"{r.bound:.4f}",
                f"{r.base:.4f}",
                f"{r.new:.4f}",
                ratio(r.new, r.base),
                f"{r.base_ms:.2f}",
                f"{r.new_ms:.2f}",
                ratio(r.new_ms, r.base_ms),
                f"{r.base_duplicates} / {r.new_duplicates}",
            ]
            for r in rows
        ],
    )


def drift_table(rows: Sequence[DriftRow]) -> str:
    return table(
        [
            "shape",
            "loads",
            "node-local",
            "planned deepseek",
            "planned new",
            "moved deepseek",
            "moved new",
            "new inter-node",
            "hold",
            "next window deepseek / new",
            "per step deepseek / new",
            "deepseek ms",
            "new ms",
            "time ratio",
        ],
        [
            [
                r.shape,
                r.workload,
                "yes" if r.local else "no",
                f"{r.base:.4f}",
                f"{r.new:.4f}",
                pct(r.base_moved),
                pct(r.new_moved),
                pct(r.new_inter_node),
                f"{r.hold:.4f}",
                f"{r.base_next:.4f} / {r.new_next:.4f}",
                f"{r.base_step:.4f} / {r.new_step:.4f}",
                f"{r.base_ms:.2f}",
                f"{r.new_ms:.2f}",
                ratio(r.new_ms, r.base_ms),
            ]
            for r in rows
        ],
    )


def sequence_table(rows: Sequence[SequenceRow]) -> str:
    return table(
        [
            "shape",
            "workload",
            "planned deepseek / new",
            "moved per window deepseek / new",
            "next window deepseek / new",
        ],
        [
            [
                r.shape,
                r.workload,
                f"{r.base:.4f} / {r.new:.4f}",
                f"{pct(r.base_moved)} / {pct(r.new_moved)}",
                f"{r.base_next:.4f} / {r.new_next:.4f}",
            ]
            for r in rows
        ],
    )


def goals(fresh: Sequence[FreshRow], drift: Sequence[DriftRow]) -> str:
    deepseek = [r for r in fresh if r.shape.startswith("deepseek")]
    deepseek_drift = [r for r in drift if r.shape.startswith("deepseek")]
    worst_fresh = min(fresh, key=lambda r: r.new - r.base)
    worst_drift = min(drift, key=lambda r: r.new - r.base)
    global_rows = [r.new for r in deepseek if not r.local] + [
        r.new for r in deepseek_drift if not r.local
    ]
    most_moved = max(deepseek_drift, key=lambda r: r.new_moved)
    slowest = max(
        [(r.new_ms / r.base_ms, r.shape, r.workload, "fresh") for r in deepseek]
        + [(r.new_ms / r.base_ms, r.shape, r.workload, "drift") for r in deepseek_drift]
    )
    duplicates = sum(r.new_duplicates for r in fresh) + sum(r.new_duplicates for r in drift)
    lines = [
        f"- balancedness >= deepseek on every workload: worst margin fresh "
        f"{worst_fresh.new - worst_fresh.base:+.4f} ({worst_fresh.shape}, {worst_fresh.workload}), "
        f"after drift {worst_drift.new - worst_drift.base:+.4f} "
        f"({worst_drift.shape}, {worst_drift.workload})",
        "- lowest balancedness where the global policy applies on DeepSeek-V3 shapes: "
        f"{min(global_rows):.4f}",
        f"- most slots moved after a 0.2 drift on DeepSeek-V3 shapes: {pct(most_moved.new_moved)} "
        f"({most_moved.shape}, {most_moved.workload}); deepseek moves "
        f"{pct(min(r.base_moved for r in deepseek_drift))}-"
        f"{pct(max(r.base_moved for r in deepseek_drift))}",
        f"- largest time ratio (new / deepseek) on DeepSeek-V3 shapes: {slowest[0]:.2f} "
        f"({slowest[1]}, {slowest[2]}, {slowest[3]})",
        f"- replicas of one expert sharing a rank in new placements: {duplicates}",
    ]
    return "\n".join(lines)


def draw(
    drift: Sequence[DriftRow], sweeps: dict[str, list[tuple[str, float, float]]], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    left = axes[0]
    left.scatter(
        [100 * r.base_moved for r in drift], [r.base for r in drift], label="deepseek", marker="x"
    )
    left.scatter(
        [100 * r.new_moved for r in drift],
        [r.new for r in drift],
        label="migration_aware",
        marker="o",
    )
    left.set_xlabel("slots refetched after a 0.2 drift (%)")
    left.set_ylabel("planned balancedness (mean / max rank load)")
    left.set_title("every shape x load distribution")
    left.legend()
    right = axes[1]
    for name, points in sweeps.items():
        right.plot(
            [100 * p[1] for p in points[1:]],
            [p[2] for p in points[1:]],
            marker="o",
            label=f"{name}: tolerance sweep",
        )
        right.scatter(
            [100 * points[0][1]], [points[0][2]], marker="x", s=80, label=f"{name}: deepseek"
        )
    right.set_xlabel("slots refetched (%)")
    right.set_ylabel("planned balancedness")
    right.set_title("trade-off knob (lognormal 1.0 loads, 0.2 drift)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)  # pyright: ignore[reportUnknownMemberType]  # matplotlib's stub


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer distributions and repeats")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--plot", type=Path, help="write the balancedness-vs-moved plot (PNG) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    repeats = 3 if args.quick else 5
    distributions = STANDARD_DISTRIBUTIONS[1::2] if args.quick else STANDARD_DISTRIBUTIONS
    policies: tuple[RebalancePolicy, RebalancePolicy] = (DeepSeekPolicy(), MigrationAwarePolicy())
    started = time.perf_counter()
    fresh: list[FreshRow] = []
    drift: list[DriftRow] = []
    for shape in STANDARD_SHAPES:
        for index, dist in enumerate(distributions):
            seed = 1000 * index + 17
            fresh.append(run_fresh(shape, dist, seed, repeats, policies))
            drift.append(run_drift(shape, dist, seed, repeats, policies))
            print(f"  {shape.name} {dist.name}", file=sys.stderr)
    lognormal = LoadDistribution("lognormal", 1.0)
    sequences = [
        run_sequence(shape, lognormal, HEATING, 4, 7, policies)
        for shape in (DEEPSEEK_V3_288, DEEPSEEK_V3_288.as_global(), QWEN3_235B)
    ] + [
        run_sequence(shape, lognormal, DRIFT, 4, 7, policies)
        for shape in (DEEPSEEK_V3_288.as_global(), DEEPSEEK_V3_320.as_global())
    ]
    sweeps: dict[str, list[tuple[str, float, float]]] = {}
    if args.plot is not None:
        for shape in (DEEPSEEK_V3_288.as_global(), DEEPSEEK_V3_320.as_global()):
            sweeps[shape.name] = sweep(shape, lognormal, 5, (0.0, 0.1, 0.3, 1.0, 3.0, 10.0))
    elapsed = time.perf_counter() - started
    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python benchmarks/bench_policy.py", *given])
    report = "\n\n".join(
        [
            "# EPLB policies: deepseek (baseline) vs migration_aware",
            "## Goals",
            goals(fresh, drift),
            "## Fresh plans (no old placement; balancedness on the planned loads)",
            "`bound` is the best balancedness any placement can reach (see "
            "`moe_protocols/eplb/analysis/bounds.py`); `node-local` = whole expert groups stay "
            "on one node (both policies honour it on those shapes).",
            fresh_table(fresh),
            "## Rebalance after a 0.2 lognormal drift, from each policy's own placement",
            "`moved` = slots refetched (expert not on that rank before) over all slots; `hold` = "
            "the old placement on the new loads; `next window` = the new plan on the following "
            "window's loads "
            "(another 0.2 drift); `per step` = mean per-step balancedness on that window with "
            f"{TOKENS_PER_STEP} tokens x top-{TOP_K} per step.",
            drift_table(drift),
            "## Load sequences (mean over windows)",
            sequence_table(sequences),
            f"Command: `{command}` ({elapsed:.0f} s on this machine, torch "
            f"{torch.__version__}, 1 thread).",
        ]
    )
    print(report)
    if args.markdown is not None:
        args.markdown.write_text(report + "\n")
    if args.plot is not None:
        draw(drift, sweeps, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
