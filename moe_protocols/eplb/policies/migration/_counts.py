"""Replica counts for a repair: close to the old ones, and no more heavy replicas than ranks."""

from __future__ import annotations

import math

import torch

from moe_protocols.eplb.policies.migration._rows import descending_order, smallest_mask

__all__ = ["limit_heavy_replicas", "repair_counts"]


def repair_counts(
    load: torch.Tensor, old: torch.Tensor, num_slots: int, cap: int, p_target: torch.Tensor
) -> torch.Tensor:
    """Replica counts close to ``old`` whose hottest replica is at most ``p_target``.

    Raises every expert to ``ceil(load / p_target)``, then gives back (or adds)
    replicas where that moves the hottest-replica load least.
    """
    # The relative slack keeps ceil() from rounding load / (load / c) up to c + 1.
    # All-zero rows have p_target 0: one replica each is enough there.
    per = torch.where(p_target > 0, p_target, 1.0).unsqueeze(1)
    need = torch.ceil(load / per * (1 - 1e-12)).clamp(1, cap).to(torch.int64)
    count = torch.maximum(old.clamp(max=cap), need)
    surplus = count.sum(dim=1) - num_slots
    if bool((surplus > 0).any()):
        depth = int((count - need).amax())
        # Removing the t-th replica from the top leaves load / (count - 1 - t) per replica.
        after = count.unsqueeze(2) - 1 - torch.arange(depth)
        removable = after >= need.unsqueeze(2)
        cost = (load.unsqueeze(2) / after.clamp(min=1)).masked_fill(~removable, math.inf)
        chosen = smallest_mask(cost.flatten(1), surplus.clamp(min=0)).view(cost.shape)
        count = count - (chosen & removable).sum(dim=2)
    if bool((surplus < 0).any()):
        depth = int((-surplus).max())
        # Adding the t-th extra replica: D'Hondt, largest load / (count + t) first.
        before = count.unsqueeze(2) + torch.arange(depth)
        addable = before < cap
        gain = (-load.unsqueeze(2) / before).masked_fill(~addable, math.inf)
        chosen = smallest_mask(gain.flatten(1), (-surplus).clamp(min=0)).view(gain.shape)
        count = count + (chosen & addable).sum(dim=2)
    return count


def limit_heavy_replicas(
    load: torch.Tensor, count: torch.Tensor, target: torch.Tensor, num_ranks: int, cap: int
) -> torch.Tensor:
    """Counts ``[X, n]`` with at most as many heavy replicas as ranks, where ``count`` has more.

    Heavy: two of them on one rank exceed ``target`` even if the rank's other
    ``S - 2`` slots hold replicas of the mean load of the ``K (S - 2)``
    lightest, so with more heavy replicas than ranks no packing reaches the
    target. Each excess one is taken from the heavy expert whose replicas
    stay lightest after the removal (in practice the one with the most
    replicas) and given to a light expert by D'Hondt.
    A row that cannot make every such move without a replica heavier than
    ``target`` (or a count above ``cap``) keeps its counts, as does a row
    with no excess.
    """
    per_replica = load / count
    slots = int(count[0].sum()) // num_ranks
    fillers = num_ranks * max(slots - 2, 0)
    # The lightest replicas a rank with two heavy ones would have to take
    # (their sum does not depend on how ties sort).
    order = descending_order(-per_replica)
    cumulative = count.gather(1, order).cumsum(dim=1).clamp(max=fillers)
    share = cumulative - torch.nn.functional.pad(cumulative[:, :-1], (1, 0))
    filler = (share * per_replica.gather(1, order)).sum(dim=1) / max(fillers, 1)
    threshold = (target - (slots - 2) * filler).clamp(min=0) / 2
    is_heavy = per_replica > threshold.unsqueeze(1)
    excess = (count * is_heavy).sum(dim=1) - num_ranks
    if not bool((excess > 0).any()):
        return count
    depth = int(excess.max())
    steps = torch.arange(depth, dtype=load.dtype)
    # Candidates [X, m, depth]: removing the t-th replica of a heavy expert,
    # or adding the t-th to one of the light experts D'Hondt would pick next.
    heavy = torch.topk(
        torch.where(is_heavy, per_replica, -1.0), int(is_heavy.sum(dim=1).max()), dim=1
    )
    heavy_count = count.gather(1, heavy.indices).to(load.dtype)
    after = heavy_count.unsqueeze(2) - 1 - steps
    cost = load.gather(1, heavy.indices).unsqueeze(2) / after.clamp(min=1)
    removable = (
        is_heavy.gather(1, heavy.indices).unsqueeze(2)
        & (after >= 1)
        & (cost <= target.view(-1, 1, 1))
    )
    light = torch.topk(
        torch.where(is_heavy, -1.0, per_replica), min(depth, load.shape[1]), dim=1
    ).indices
    before = count.gather(1, light).to(load.dtype).unsqueeze(2) + steps
    addable = ~is_heavy.gather(1, light).unsqueeze(2) & (before < cap)
    gain = (-load.gather(1, light).unsqueeze(2) / before).masked_fill(~addable, math.inf)
    # Only rows that can make every move; the others keep their counts.
    excess = torch.where(
        (removable.flatten(1).sum(dim=1) >= excess) & (addable.flatten(1).sum(dim=1) >= excess),
        excess.clamp(min=0),
        0,
    )
    taken = smallest_mask(cost.masked_fill(~removable, math.inf).flatten(1), excess)
    given = smallest_mask(gain.flatten(1), excess)
    taken_count = taken.view(cost.shape).sum(dim=2)
    given_count = given.view(gain.shape).sum(dim=2)
    return count.scatter_add(1, heavy.indices, -taken_count).scatter_add(1, light, given_count)
