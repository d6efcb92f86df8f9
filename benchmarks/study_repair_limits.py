"""How few slots can a repair move and still match the baseline's balance? An idealised study.

Not a policy and not fast: a sequential greedy in NumPy that repairs each
layer one move at a time, choosing every move by looking at all candidates.
It answers a question about the *problem*, not about our implementation: on a
given shape, after a 0.2 lognormal drift, how many slots must any repair built
from swaps and replica retargets refetch to bring every rank within a target,
and what balancedness does that target give compared with the DeepSeek
baseline's from-scratch plan?

Per layer, starting from the ``migration_aware`` placement of window 0 (the
same starting point as the drift rows of ``bench_policy.py``, same seeds) and
the loads of window 1, with ``LB`` the layer's lower bound on the max rank
load (``max_rank_load_lower_bound``) and ``U = (1 + t) LB``:

* moves: a **swap** of two replicas between two ranks (no expert twice on a
  rank), or a **retarget**, which re-points one replica of an expert with two
  or more replicas to another expert (one slot; the replica counts change, so
  the load of every rank holding either expert changes);
* objective: the total excess ``sum over ranks of max(0, load - U)``;
* each step applies the move that lowers the excess most per newly refetched
  slot; moves that refetch nothing net (undoing an earlier move, sending on a
  replica that arrived in this repair) go first, by largest gain;
* a layer stops when every rank is within ``U``, or when no move lowers the
  excess.

``--targets deepseek`` uses, per layer, the baseline plan's own peak as ``U``:
the cheapest repair that matches the baseline layer by layer - which a policy
could only aim for by running the baseline first.

Usage::

    python benchmarks/study_repair_limits.py [--layers 58] [--targets 0.004,0.008,deepseek]

About half a second per layer and target on DeepSeek-V3 320x64/global; the
default 20 layers x 3 targets x 7 workloads take 4-5 minutes on one core.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from moe_protocols._torch_typed import from_numpy
from moe_protocols.eplb._metrics import expected_rank_loads
from moe_protocols.eplb.analysis import (
    max_rank_load_lower_bound,
    migration_stats,
    realised_balancedness,
)
from moe_protocols.eplb.policies import DeepSeekPolicy, MigrationAwarePolicy
from moe_protocols.eplb.workloads import (
    STANDARD_DISTRIBUTIONS,
    STANDARD_SHAPES,
    Drift,
    MoEShape,
    drift_sequence,
)

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

DRIFT = Drift("lognormal", 0.2)
DEEPSEEK = "deepseek"


def _excess(load: Floats, limit: float) -> Floats:
    return np.maximum(load - limit, 0.0)


def repair_layer(
    weight: Floats, old: Ints, num_ranks: int, limit: float, max_moves: int = 5000
) -> tuple[Ints, bool]:
    """Greedy repair of one layer's ``old`` slot -> expert map; returns ``(new map, stalled)``.

    Args:
        weight: ``[n]`` expert loads of the window being planned.
        old: ``[P]`` expert in each slot (every expert at least once, none twice on a rank).
        num_ranks: ``R``; slot ``s`` is on rank ``s // (P / R)``.
        limit: ``U``, the load every rank should end within.
        max_moves: safety bound on moves (running out counts as a stall).

    Raises:
        ValueError: ``old`` holds an expert twice on one rank, or misses one.
    """
    # int(): numpy types shapes as Any, and np.arange(Any) matches no overload for pyright.
    num_experts = int(weight.shape[0])
    num_slots = int(old.shape[0])
    rank_of = np.arange(num_slots) // (num_slots // num_ranks)
    slots = old.copy()
    holds = np.zeros((num_ranks, num_experts), dtype=np.float64)
    np.add.at(holds, (rank_of, slots), 1.0)
    if holds.max() > 1:
        raise ValueError("the old placement holds an expert twice on one rank")
    if (holds.sum(axis=0) == 0).any():
        raise ValueError("the old placement misses an expert")
    # refetch[r, e] = 1 when rank r did not hold e before: holding it now costs a slot.
    refetch = (holds == 0).astype(np.int64)
    count = holds.sum(axis=0)
    stalled = False
    for _ in range(max_moves):
        per_replica = weight / count
        load = holds @ per_replica
        if load.max() <= limit * (1 + 1e-12):
            break
        now = _excess(load, limit)
        total = float(now.sum())
        hot = load > limit
        on_hot = np.nonzero(hot[rank_of])[0]
        candidates: list[tuple[Floats, Ints, int, Ints, Ints]] = []

        # Swaps: a replica on a hot rank for one on any other rank.
        s1 = np.repeat(on_hot, num_slots)
        s2 = np.tile(np.arange(num_slots), on_hot.shape[0])
        r1, r2 = rank_of[s1], rank_of[s2]
        a1, a2 = slots[s1], slots[s2]
        ok = (r1 != r2) & (holds[r2, a1] == 0) & (holds[r1, a2] == 0)
        s1, s2, r1, r2, a1, a2 = s1[ok], s2[ok], r1[ok], r2[ok], a1[ok], a2[ok]
        if s1.shape[0] > 0:
            shift = per_replica[a2] - per_replica[a1]
            gain = (
                now[r1]
                + now[r2]
                - _excess(load[r1] + shift, limit)
                - _excess(load[r2] - shift, limit)
            )
            cost = refetch[r1, a2] - refetch[r1, a1] + refetch[r2, a1] - refetch[r2, a2]
            candidates.append((gain, cost, 0, s1, s2))

        # Retargets: a replica of an expert with >= 2 replicas becomes a replica of
        # another expert. Worth trying on a hot rank (any new expert), or anywhere
        # for an expert a hot rank holds (its replicas get lighter).
        hot_experts = np.nonzero(holds[hot].sum(axis=0) > 0)[0]
        elsewhere = np.nonzero(~hot[rank_of])[0]
        slot = np.concatenate(
            [np.repeat(on_hot, num_experts), np.repeat(elsewhere, hot_experts.shape[0])]
        )
        new = np.concatenate(
            [
                np.tile(np.arange(num_experts), on_hot.shape[0]),
                np.tile(hot_experts, elsewhere.shape[0]),
            ]
        )
        rank, gone = rank_of[slot], slots[slot]
        ok = (count[gone] >= 2) & (holds[rank, new] == 0) & (count[new] < num_ranks)
        slot, new, rank, gone = slot[ok], new[ok], rank[ok], gone[ok]
        if slot.shape[0] > 0:
            heavier = weight[gone] / (count[gone] - 1)
            lighter = weight[new] / (count[new] + 1)
            after = (
                load[None, :]
                + holds[:, gone].T * (heavier - per_replica[gone])[:, None]
                + holds[:, new].T * (lighter - per_replica[new])[:, None]
            )
            index = np.arange(int(slot.shape[0]))
            after[index, rank] = load[rank] - per_replica[gone] + lighter
            gain = total - _excess(after, limit).sum(axis=1)
            cost = refetch[rank, new] - refetch[rank, gone]
            candidates.append((gain, cost, 1, slot, new))

        best: tuple[tuple[float, float], int, int, int] | None = None
        tiny = 1e-12 * float(load.max())
        for free in (True, False):
            for gain, cost, kind, first, second in candidates:
                usable = (gain > tiny) & ((cost <= 0) if free else (cost > 0))
                if not usable.any():
                    continue
                score = np.where(usable, gain if free else gain / np.maximum(cost, 1), -np.inf)
                i = int(np.argmax(score))
                key = (float(score[i]), float(gain[i]))
                if best is None or key > best[0]:
                    best = (key, kind, int(first[i]), int(second[i]))
            if best is not None:
                break
        if best is None:
            stalled = True
            break
        _, kind, first_index, second_index = best
        if kind == 0:
            ra, rb = rank_of[first_index], rank_of[second_index]
            a, b = slots[first_index], slots[second_index]
            holds[ra, a] -= 1
            holds[ra, b] += 1
            holds[rb, b] -= 1
            holds[rb, a] += 1
            slots[first_index], slots[second_index] = b, a
        else:
            r, a, b = rank_of[first_index], slots[first_index], second_index
            holds[r, a] -= 1
            holds[r, b] += 1
            count[a] -= 1
            count[b] += 1
            slots[first_index] = b
    else:
        stalled = True  # out of moves: report it like a stall
    return slots, stalled


def study(shape: MoEShape, layers: int, targets: Sequence[str]) -> list[str]:
    """Markdown rows: one per workload and target."""
    args = (shape.num_physical, shape.num_groups, shape.num_nodes, shape.num_ranks)
    lines: list[str] = []
    for index, dist in enumerate(STANDARD_DISTRIBUTIONS):
        seed = 1000 * index + 17  # as in bench_policy.py
        windows = drift_sequence(
            dist.sample(shape.num_layers, shape.num_logical, seed=seed), DRIFT, 2, seed=seed + 1
        )[:, :layers]  # layers are independent problems for both policies
        policy = MigrationAwarePolicy()
        old = policy.rebalance_experts(windows[0], *args)
        load = windows[1]
        ours = policy.rebalance_experts(load, *args, old)
        deepseek = DeepSeekPolicy().rebalance_experts(load, *args)
        base_balance = realised_balancedness(deepseek, load, shape.num_ranks)
        ours_balance = realised_balancedness(ours, load, shape.num_ranks)
        ours_moved = migration_stats(old, ours, shape.num_ranks).fraction
        bound = max_rank_load_lower_bound(load, shape.num_physical, shape.num_ranks).numpy()
        base_peak = expected_rank_loads(deepseek, load, shape.num_ranks).amax(dim=1).numpy()
        for target in targets:
            started = time.perf_counter()
            new = torch.empty_like(old)
            stalled = 0
            for layer in range(layers):
                limit = (
                    float(base_peak[layer])
                    if target == DEEPSEEK
                    else (1 + float(target)) * float(bound[layer])
                )
                repaired, stuck = repair_layer(
                    load[layer].numpy(), old[layer].numpy(), shape.num_ranks, limit
                )
                new[layer] = from_numpy(repaired)
                stalled += stuck
            balance = realised_balancedness(new, load, shape.num_ranks)
            moved = migration_stats(old, new, shape.num_ranks).fraction
            verdict = "both" if balance >= base_balance and moved <= 0.2 else "no"
            lines.append(
                f"| {dist.name} | {target} | {balance:.5f} | {base_balance:.5f} | "
                f"{100 * moved:.1f} % | {ours_balance:.5f} / {100 * ours_moved:.1f} % | "
                f"{stalled} | {verdict} |"
            )
            print(lines[-1], f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    names = [shape.name for shape in STANDARD_SHAPES if not shape.hierarchical]
    parser.add_argument("--shape", choices=names, default="deepseek-v3/320x64/global")
    parser.add_argument("--layers", type=int, default=20, help="first N layers (58: all)")
    parser.add_argument(
        "--targets",
        default=f"0.004,0.008,{DEEPSEEK}",
        help=f"comma-separated t of U = (1 + t) LB, or '{DEEPSEEK}' (its per-layer peak)",
    )
    args = parser.parse_args(argv)
    shape = next(s for s in STANDARD_SHAPES if s.name == args.shape)
    targets = args.targets.split(",")
    for target in targets:
        if target == DEEPSEEK:
            continue
        try:
            value = float(target)
        except ValueError:
            parser.error(f"--targets: {target!r} is neither a number nor {DEEPSEEK!r}")
        if not value >= 0:
            parser.error(f"--targets: t must be >= 0, got {target}")
    if not 1 <= args.layers <= shape.num_layers:
        parser.error(f"--layers must be in [1, {shape.num_layers}]")
    torch.set_num_threads(1)
    print(f"Shape {shape.name}, first {args.layers} layers, 0.2 lognormal drift.\n")
    print(
        "| loads | target t | greedy balancedness | deepseek | greedy moved | "
        "migration_aware (balancedness / moved) | layers stalled | both goals |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for line in study(shape, args.layers, targets):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
