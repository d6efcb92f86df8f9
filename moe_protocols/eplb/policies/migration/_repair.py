"""Keep-and-repair plans: keep the old placement, re-apportion, fill, swap, or plan afresh."""

from __future__ import annotations

import torch

from moe_protocols.eplb.policies._apportion import replica_counts
from moe_protocols.eplb.policies._slots import preserve_intra_rank_slots
from moe_protocols.eplb.policies.migration._counts import limit_heavy_replicas, repair_counts
from moe_protocols.eplb.policies.migration._open import search_and_read
from moe_protocols.eplb.policies.migration._pack import FRESH_SHARE, fresh_plan
from moe_protocols.eplb.policies.migration._rows import (
    EPS,
    Rows,
    counts_of,
    expand,
    first_copies,
    holding,
    repeats,
)
from moe_protocols.eplb.policies.migration._swaps import fix_duplicates, pair_search

__all__ = ["keep_stayer_slots", "repair"]


def repair(
    rows: Rows,
    old: torch.Tensor,
    tolerance: float,
    replan_gain: float,
    fresh_gain: float,
    max_rounds: int,
) -> torch.Tensor:
    """Keep-and-repair plan for every row from the old ``[X, K, S]`` placement (``-1`` = free).

    Rows already within their target keep the old placement untouched.
    Returns the ``[X, K, S]`` expert ids.
    """
    num_rows = rows.load.shape[0]
    _, hottest = replica_counts(rows.load, rows.num_slots, rows.cap)
    target = rows.target(hottest, tolerance)
    todo = (~_settled(old, rows.load, target)).nonzero().squeeze(1)
    if todo.numel() == 0:
        return old.clone()
    if todo.numel() == num_rows:
        return _repair_rows(
            rows.load, old, hottest, target, rows, tolerance, replan_gain, fresh_gain, max_rounds
        )
    placed = old.clone()
    placed[todo] = _repair_rows(
        rows.load[todo],
        old[todo],
        hottest[todo],
        target[todo],
        rows,
        tolerance,
        replan_gain,
        fresh_gain,
        max_rounds,
    )
    return placed


def _repair_rows(
    load: torch.Tensor,
    old: torch.Tensor,
    hottest: torch.Tensor,
    target: torch.Tensor,
    rows: Rows,
    tolerance: float,
    replan_gain: float,
    fresh_gain: float,
    max_rounds: int,
) -> torch.Tensor:
    """:func:`repair` for the ``[X', n]`` loads of the rows that need one (sizes from ``rows``)."""
    num_rows, n = load.shape
    old_count = counts_of(first_copies(old).view(num_rows, -1), n)
    count = repair_counts(load, old_count, rows.num_slots, rows.cap, hottest * (1 + tolerance))
    placed, peak = _repair_pass(load, old, count, target, rows, max_rounds)

    # Only rows that missed their target are candidates for more, and since
    # no plan beats the bound, another one can only win by replan_gain where
    # the repair stayed that far above it.
    bound = target / (1 + tolerance)
    missed = (peak > torch.maximum(target, bound * (1 + replan_gain))).nonzero().squeeze(1)
    if missed.numel() > 0:
        # More heavy replicas than ranks (Zipf loads) defeat any packing:
        # repair again with at most one per rank.
        spread = limit_heavy_replicas(
            load[missed], count[missed], target[missed], rows.num_ranks, rows.cap
        )
        changed = (spread != count[missed]).any(dim=1)
        if bool(changed.any()):
            retry = missed[changed]
            sub = Rows(load[retry], rows.num_ranks, rows.slots, rows_per_layer=1)
            again, again_peak = _repair_pass(
                load[retry], old[retry], spread[changed], target[retry], sub, max_rounds
            )
            better = again_peak < peak[retry]
            placed[retry[better]] = again[better]
            peak[retry[better]] = again_peak[better]

    # A fresh plan moves nearly all of a row's slots: worth it only where it
    # can lower the peak by fresh_gain, so only where the repair stayed that
    # far above the bound. A duplicate the swaps could not remove (when the
    # row has room for none) also calls for one.
    stuck = repeats(placed).flatten(1).any(dim=1) & (rows.slots <= n)
    missed_mask = (peak > torch.maximum(target, bound * (1 + fresh_gain))) | stuck
    if bool(missed_mask.any()):
        index = missed_mask.nonzero().squeeze(1)
        sub = Rows(load[index], rows.num_ranks, rows.slots, rows_per_layer=1)
        fresh, fresh_peak = fresh_plan(sub, tolerance * FRESH_SHARE, max_rounds)
        better = (fresh_peak * (1 + fresh_gain) < peak[index]) | stuck[index]
        if bool(better.any()):
            # Ranks are interchangeable: give each new rank's contents to the
            # old rank that already holds most of them.
            placed[index[better]] = _match_ranks(fresh[better], old[index[better]], n)
    return placed


def _repair_pass(
    load: torch.Tensor,
    old: torch.Tensor,
    count: torch.Tensor,
    target: torch.Tensor,
    rows: Rows,
    max_rounds: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Old ``[X, K, S]`` placement re-apportioned to ``count`` and swap-repaired.

    Returns ``([X, K, S] expert ids, [X] max rank load)``.
    """
    num_rows, n = load.shape
    flat = first_copies(old).view(num_rows, -1)
    per_replica = load / count
    drop = (counts_of(flat, n) - count).clamp(min=0)
    if bool((drop > 0).any()):
        flat = _drop_replicas(flat, drop, per_replica, rows.slots)
    add = (count - counts_of(flat, n)).clamp(min=0)
    if bool((add > 0).any()):
        flat = _fill(flat, add, per_replica, rows.slots)
    placed = flat.view(num_rows, rows.num_ranks, rows.slots).contiguous()
    dirty = repeats(placed).flatten(1).any(dim=1).nonzero().squeeze(1)
    if dirty.numel() > 0:
        subset = placed[dirty]
        fix_duplicates(subset, per_replica[dirty], max_rounds=2 * rows.num_slots)
        placed[dirty] = subset
    # Cheap paired swaps first; the open search finishes the rows they leave above target.
    placed = pair_search(placed, per_replica, target, max_rounds, economical=True)
    slot_load = per_replica.gather(1, placed.view(num_rows, -1))
    placed = search_and_read(placed, slot_load, n, target, max_rounds, holding(old, n))
    peak = (
        per_replica.gather(1, placed.view(num_rows, -1)).view(placed.shape).sum(dim=2).amax(dim=1)
    )
    return placed, peak


def _settled(old: torch.Tensor, load: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[X]`` rows whose old ``[X, K, S]`` placement is complete and already within ``target``.

    Complete: no free slot, every expert placed, and no expert twice on a
    rank where the row has room to avoid it.
    """
    num_rows, num_ranks, slots = old.shape
    n = load.shape[1]
    flat = old.view(num_rows, -1)
    count = counts_of(flat, n)
    complete = (flat >= 0).all(dim=1) & (count > 0).all(dim=1)
    if slots <= n:
        complete &= ~repeats(old).flatten(1).any(dim=1)
    per_replica = load / count.clamp(min=1)
    rank_load = per_replica.gather(1, flat.clamp(min=0)).view(num_rows, num_ranks, slots).sum(2)
    return complete & (rank_load.amax(dim=1) <= target * (1 + EPS))


def _rank_order_score(flat: torch.Tensor, per_replica: torch.Tensor, slots: int) -> torch.Tensor:
    """``[X, Q]`` unique int per slot, larger on more loaded ranks (then higher slot)."""
    num_rows, _num_slots = flat.shape
    item = torch.where(flat >= 0, per_replica.gather(1, flat.clamp(min=0)), 0.0)
    rank_load = item.view(num_rows, -1, slots).sum(dim=2)
    by_load = torch.sort(rank_load, dim=1, stable=True).indices
    position = torch.empty_like(by_load).scatter_(
        1, by_load, torch.arange(rank_load.shape[1]).expand(num_rows, -1)
    )
    return position.repeat_interleave(slots, dim=1) * slots + torch.arange(slots).repeat(
        rank_load.shape[1]
    )


def _drop_replicas(
    flat: torch.Tensor, drop: torch.Tensor, per_replica: torch.Tensor, slots: int
) -> torch.Tensor:
    """Free ``drop[x, e]`` replicas of each expert, those on the most loaded ranks first."""
    num_rows, n = drop.shape
    score = _rank_order_score(flat, per_replica, slots)
    ids = torch.where(flat >= 0, flat, n)
    remaining = torch.cat([drop, torch.zeros(num_rows, 1, dtype=torch.int64)], dim=1)
    for _ in range(int(drop.max())):
        wanted = (remaining > 0).gather(1, ids)
        candidate = torch.where(wanted, score, -1)
        best = torch.full((num_rows, n + 1), -1, dtype=torch.int64)
        best.scatter_reduce_(1, ids, candidate, reduce="amax")
        chosen = wanted & (candidate == best.gather(1, ids))
        flat = flat.masked_fill(chosen, -1)
        ids = ids.masked_fill(chosen, n)
        remaining = (remaining - (remaining > 0).to(torch.int64)).clamp(min=0)
    return flat


def _fill(
    flat: torch.Tensor, add: torch.Tensor, per_replica: torch.Tensor, slots: int
) -> torch.Tensor:
    """Put ``add[x, e]`` new replicas into the free slots: heaviest first, lightest ranks first."""
    num_rows, _n = add.shape
    free = flat < 0
    width = int(free.sum(dim=1).max())
    if width == 0:
        return flat
    score = _rank_order_score(flat, per_replica, slots)
    # Round robin over the ranks with free slots (lightest first): consecutive
    # copies of one expert land on different ranks.
    num_slots = flat.shape[1]
    turn = free.view(num_rows, -1, slots).cumsum(dim=2).view(num_rows, num_slots) - 1
    order = torch.where(free, turn * num_slots + score, torch.iinfo(torch.int64).max)
    free_slots = torch.topk(order, width, dim=1, largest=False).indices
    kinds = int((add > 0).sum(dim=1).max())
    newcomer_load, newcomer = torch.topk(torch.where(add > 0, per_replica, -1.0), kinds, dim=1)
    copies = torch.where(newcomer_load >= 0, add.gather(1, newcomer), 0)
    incoming = expand(newcomer, copies, width)
    use = free.gather(1, free_slots) & (torch.arange(width) < copies.sum(dim=1, keepdim=True))
    return flat.scatter(1, free_slots, torch.where(use, incoming, flat.gather(1, free_slots)))


def _match_ranks(new: torch.Tensor, old: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Reorder the ranks of ``new`` ``[X, K, S]`` so that rank contents overlap ``old`` most.

    In rounds, every unmatched new rank claims the unmatched old rank that
    holds most of its experts, and each old rank takes its strongest claimant
    (ties: lower ranks first); ranks sharing nothing are paired in index
    order at the end. ``-1`` in ``old`` is a free slot.
    """
    num_rows, num_ranks, slots = new.shape
    held = holding(old, num_experts).view(num_rows, num_ranks, num_experts).to(torch.float32)
    # overlap[x, i, j]: experts of new rank i that old rank j holds.
    overlap = (
        held.transpose(1, 2)
        .gather(1, new.view(num_rows, -1, 1).expand(-1, -1, num_ranks))
        .view(num_rows, num_ranks, slots, num_ranks)
        .sum(dim=2)
    )
    # Distinct scores (exact in float32): overlap first, then lower ranks.
    later = torch.arange(num_ranks - 1, -1, -1, dtype=overlap.dtype)
    score = overlap * num_ranks**2 + later.view(1, -1, 1) * num_ranks + later.view(1, 1, -1)
    score = torch.where(overlap > 0, score, -1.0)
    source = torch.full((num_rows, num_ranks), -1, dtype=torch.int64)
    new_done = torch.zeros(num_rows, num_ranks, dtype=torch.bool)
    for _ in range(num_ranks):
        best, wanted = score.max(dim=2)
        claims = best >= 0
        if not bool(claims.any()):
            break
        strongest = torch.full((num_rows, num_ranks + 1), -1.0)
        strongest.scatter_reduce_(1, torch.where(claims, wanted, num_ranks), best, reduce="amax")
        won = claims & (best == strongest.gather(1, wanted))
        row, rank = won.nonzero(as_tuple=True)
        source[row, wanted[row, rank]] = rank
        new_done |= won
        old_done = source >= 0
        score = score.masked_fill(new_done.unsqueeze(2) | old_done.unsqueeze(1), -1.0)
    # The rest, in index order: unmatched new ranks to unmatched old ranks.
    spare_new = torch.sort(new_done.to(torch.int8), dim=1, stable=True).indices
    spare_old = torch.sort((source >= 0).to(torch.int8), dim=1, stable=True).indices
    left = (~new_done).sum(dim=1, keepdim=True)
    fill = torch.arange(num_ranks) < left
    source = source.scatter(1, spare_old, torch.where(fill, spare_new, source.gather(1, spare_old)))
    return new.gather(1, source.unsqueeze(2).expand(-1, -1, slots))


def keep_stayer_slots(new_map: torch.Tensor, old: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """:func:`preserve_intra_rank_slots` of ``[L, P]`` maps, only where it can move something.

    It works rank by rank, and on a rank whose old slots hold distinct
    experts it leaves the slots as they are unless a changed slot holds an
    expert the old rank had. Swaps and fills write into the slot they free,
    so that is a small share of the ranks. Same result as applying it to
    every rank.
    """
    num_layers, num_physical = new_map.shape
    slots = num_physical // num_ranks
    by_rank = new_map.reshape(num_layers * num_ranks, slots).clone()
    old_by_rank = old.reshape(num_layers * num_ranks, slots)
    held_before = (by_rank.unsqueeze(2) == old_by_rank.unsqueeze(1)).any(dim=2)
    old_repeats = repeats(old_by_rank.unsqueeze(1)).squeeze(1).any(dim=1, keepdim=True)
    changed = ((held_before | old_repeats) & (by_rank != old_by_rank)).any(dim=1)
    changed = changed.nonzero().squeeze(1)
    if changed.numel() > 0:
        by_rank[changed] = preserve_intra_rank_slots(by_rank[changed], old_by_rank[changed], 1)
    return by_rank.view(num_layers, num_physical)
