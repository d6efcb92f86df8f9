"""From-scratch plans: capped D'Hondt counts, dealing replicas onto ranks, paired swaps."""

from __future__ import annotations

from typing import Final

import torch

from moe_protocols.eplb.policies._apportion import replica_counts
from moe_protocols.eplb.policies.migration._counts import limit_heavy_replicas
from moe_protocols.eplb.policies.migration._rows import Rows, descending_order, expand
from moe_protocols.eplb.policies.migration._swaps import pair_search

__all__ = ["FRESH_SHARE", "fresh_plan"]

# A from-scratch plan aims this much closer to the bound than a repair: it has
# no slots to save by stopping early, only time.

# A from-scratch plan aims this much closer to the bound than a repair: it has
# no slots to save by stopping early, only time.
FRESH_SHARE: Final = 0.25


# Paired rounds of a fresh plan, at most: on DeepSeek-V3 shapes rounds 7-16
# added 0.02-0.3 % balancedness for about half of a fresh plan's time.
_FRESH_ROUNDS: Final = 6


# A fresh plan more than this fraction above its target is retried with at
# most one heavy replica per rank (see ``limit_heavy_replicas``).
_RETRY_ABOVE: Final = 0.01


def fresh_plan(rows: Rows, tolerance: float, max_rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From-scratch plan for every row: ``([X, K, S] expert ids, [X] max rank load)``."""
    max_rounds = min(max_rounds, _FRESH_ROUNDS)
    load = rows.load
    count, hottest = replica_counts(load, rows.num_slots, rows.cap)
    target = rows.target(hottest, tolerance)
    placed, peak = _pack(load, count, target, rows.num_ranks, max_rounds)
    # Rows far above target: often more heavy replicas than ranks (Zipf
    # loads); retry with at most one per rank and keep the better plan.
    far = (peak > target * (1 + _RETRY_ABOVE)).nonzero().squeeze(1)
    if far.numel() > 0:
        spread = limit_heavy_replicas(load[far], count[far], target[far], rows.num_ranks, rows.cap)
        changed = (spread != count[far]).any(dim=1)
        if bool(changed.any()):
            retry = far[changed]
            again, again_peak = _pack(
                load[retry], spread[changed], target[retry], rows.num_ranks, max_rounds
            )
            better = again_peak < peak[retry]
            placed[retry[better]] = again[better]
            peak[retry[better]] = again_peak[better]
    return placed, peak


def _pack(
    load: torch.Tensor, count: torch.Tensor, target: torch.Tensor, num_ranks: int, max_rounds: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deal ``count`` replicas of each expert onto ranks and improve by paired swaps.

    Returns ``([X, K, S] expert ids, [X] max rank load)``.
    """
    num_slots = int(count[0].sum())
    per_replica = load / count
    order = descending_order(per_replica)
    expert_desc = expand(order, count.gather(1, order), num_slots)
    dealt = _deal(expert_desc, per_replica.gather(1, expert_desc), num_ranks)
    placed = expert_desc.gather(1, dealt.flatten(1)).view(dealt.shape)
    placed = pair_search(placed, per_replica, target, max_rounds, economical=False)
    peak = per_replica.gather(1, placed.flatten(1)).view(placed.shape).sum(dim=2).amax(dim=1)
    return placed, peak


def _deal(expert: torch.Tensor, weight: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Deal replicas sorted heaviest first onto ranks in rounds of ``K``.

    Each round the round's heaviest replica goes to the lightest rank. Copies
    of one expert are adjacent, so only the run of copies that crosses into a
    round can meet its own earlier copies; those go to the lightest ranks
    without one.

    Args:
        expert: ``[X, Q]`` expert of each replica, heaviest replica first.
        weight: ``[X, Q]`` load of each replica (non-increasing along a row).
        num_ranks: ``K``; divides ``Q``.

    Returns:
        ``[X, K, S]`` position (in ``expert``'s order) of the replica in each slot.
    """
    num_rows, num_slots = expert.shape
    slots = num_slots // num_ranks
    rows = torch.arange(num_rows).unsqueeze(1)
    placed = torch.empty(num_rows, num_ranks, slots, dtype=torch.int64)
    rank_load = torch.zeros(num_rows, num_ranks, dtype=weight.dtype)
    batch = torch.arange(num_ranks)
    big = weight.sum(dim=1, keepdim=True) + 1
    for round_ in range(slots):
        start = round_ * num_ranks
        key = rank_load
        if round_ > 0:
            first = expert[:, start]
            crossing = expert[:, start - 1] == first
            if bool(crossing.any()):
                previous = expert.gather(1, placed[:, :, :round_].flatten(1)).view(
                    num_rows, num_ranks, round_
                )
                holds = (previous == first.view(-1, 1, 1)).any(dim=2) & crossing.unsqueeze(1)
                # Ranks holding the crossing expert sort last; its copies come first
                # in the round and so land on the lightest ranks without it.
                key = rank_load + holds * big
        order = torch.sort(key, dim=1, stable=True).indices
        placed[rows, order, round_] = batch + start
        rank_load.scatter_add_(1, order, weight[:, start : start + num_ranks])
    return placed
