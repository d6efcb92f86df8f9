"""Swaps between paired ranks, and swapping second copies of an expert off a rank."""

from __future__ import annotations

import math
from typing import Final, NamedTuple

import torch

from moe_protocols.eplb.policies.migration._rows import repeats

__all__ = ["fix_duplicates", "pair_search"]

# Paired rounds shift the pairing through this many partners before a row
# that makes no swap gives up.
_SHIFTS: Final = 4


def pair_search(
    placed: torch.Tensor,
    per_replica: torch.Tensor,
    target: torch.Tensor,
    max_rounds: int,
    economical: bool,
) -> torch.Tensor:
    """Lower the hottest ranks by swaps between paired ranks; returns the new ``[X, K, S]``.

    Each round sorts every row's ranks by load and pairs the i-th heaviest
    with the i-th lightest (all rows and pairs at once); each pair makes the
    one swap of a replica of each that brings the two loads closest,
    provided it lowers the pair's maximum and puts no expert on a rank that
    already holds it. Rows whose hottest rank is within ``target``, or that
    made no swap, retire.

    ``economical`` (repairs: every swap refetches two slots): only ranks
    above ``target`` trade, and only by swaps that bring them within it.

    Args:
        placed: ``[X, K, S]`` expert ids (rows of ``per_replica``).
        per_replica: ``[X, n]`` load of one replica of each expert.
        target: ``[X]`` max rank load at which a row stops.
        max_rounds: bound on rounds.
        economical: see above.
    """
    num_rows, num_ranks, _ = placed.shape
    result = placed.clone()
    if num_ranks < 2 or max_rounds == 0 or num_rows == 0:
        return result
    # float32 is exact enough to pick swaps and halves the work of the big tensors.
    scale = per_replica.amax(dim=1, keepdim=True).clamp(min=1e-300)
    weight = (per_replica / scale).to(torch.float32)
    limit = (target.unsqueeze(1) / scale).to(torch.float32) * (1 + 1e-6)
    active = torch.arange(num_rows)
    work = placed.clone()
    # Repairs keep the pairing: each partner change would buy a few more swaps.
    shifts = 1 if economical else _SHIFTS
    stalled = torch.zeros(num_rows, dtype=torch.int64)
    for round_ in range(max_rounds):
        rows = work.shape[0]
        slot_load = weight.gather(1, work.view(rows, -1)).view(work.shape)
        rank_load = slot_load.sum(dim=2)
        # A row that made no swap last round would make none again.
        busy = (rank_load.amax(dim=1, keepdim=True) > limit).squeeze(1) & (stalled < shifts)
        if not bool(busy.all()):
            result[active] = work
            keep = busy.nonzero().squeeze(1)
            if keep.numel() == 0:
                return result
            active, work, weight, limit = active[keep], work[keep], weight[keep], limit[keep]
            stalled = stalled[keep]
            slot_load, rank_load = slot_load[keep], rank_load[keep]
        # Round t pairs the i-th heaviest with the (i + t mod 4)-th lightest, so a
        # hot rank that cannot trade with one partner meets others.
        pairing = _pair_ranks(rank_load, round_ % shifts)
        best = _best_swaps(work, slot_load, rank_load, pairing, weight.shape[1])
        accept = best.value < best.half_gap * (1 - 1e-6)  # the pair's maximum drops
        if economical:
            accept &= _economical(best, limit)
        stalled = torch.where(accept.any(dim=1), 0, stalled + 1)
        _apply_swaps(work, pairing, best, accept)
    result[active] = work
    return result


class _Pairing(NamedTuple):
    """Each row's ranks paired for one round: ``hot[:, i]`` trades with ``cold[:, i]``."""

    hot: torch.Tensor
    cold: torch.Tensor


class _Swaps(NamedTuple):
    """The best swap of every pair, and what the pair's ranks carry."""

    value: torch.Tensor
    """``[rows, pairs]`` ``|d - half_gap|`` of the best swap moving ``d`` from hot to cold."""
    choice: torch.Tensor
    """``[rows, pairs]`` ``give * slots + take``: the slots the swap exchanges."""
    items: torch.Tensor
    """``[rows, 2 * pairs, slots]`` experts on the hot ranks, then on the cold ones."""
    hot_total: torch.Tensor
    cold_total: torch.Tensor
    half_gap: torch.Tensor
    """``[rows, pairs]`` half the load gap of each pair."""


def _pair_ranks(rank_load: torch.Tensor, shift: int) -> _Pairing:
    num_ranks = rank_load.shape[1]
    pairs = num_ranks // 2
    order = torch.sort(rank_load, dim=1, descending=True, stable=True).indices
    cold = order[:, num_ranks - pairs :].flip(1).roll(-shift, dims=1)
    return _Pairing(order[:, :pairs], cold)


def _best_swaps(
    work: torch.Tensor,
    slot_load: torch.Tensor,
    rank_load: torch.Tensor,
    pairing: _Pairing,
    num_experts: int,
) -> _Swaps:
    """For every pair, the swap of one replica each that brings the two loads closest."""
    rows, num_ranks, slots = work.shape
    hot, cold = pairing
    pairs = hot.shape[1]
    index = torch.cat([hot, cold], dim=1).unsqueeze(2).expand(-1, -1, slots)
    items = work.gather(1, index)
    loads = slot_load.gather(1, index)
    totals = rank_load.gather(1, index[:, :, 0])
    hot_total, cold_total = totals[:, :pairs], totals[:, pairs:]
    # present[x, k * n + e]: rank k holds expert e.
    rank_offset = torch.arange(num_ranks).unsqueeze(1) * num_experts
    present = torch.zeros(rows, num_ranks * num_experts, dtype=torch.bool)
    present.scatter_(1, (work + rank_offset).view(rows, -1), True)
    partner = torch.cat([cold, hot], dim=1).unsqueeze(2) * num_experts + items
    clash = present.gather(1, partner.view(rows, -1)).view(items.shape)
    # A replica whose expert the partner rank holds cannot go there: an
    # infinite load in d = hot - cold (cold loads enter negated) rules its swaps out.
    loads[:, pairs:].neg_()
    loads.masked_fill_(clash, math.inf)
    half_gap = ((hot_total - cold_total) / 2).unsqueeze(2).unsqueeze(3)
    # max(hot - d, cold + d) = mid + |d - half_gap| for a swap moving d.
    miss = (loads[:, :pairs].unsqueeze(3) + loads[:, pairs:].unsqueeze(2)).sub_(half_gap)
    value, choice = miss.abs_().view(rows, pairs, slots * slots).min(dim=2)
    return _Swaps(value, choice, items, hot_total, cold_total, half_gap.view(rows, pairs))


def _economical(best: _Swaps, limit: torch.Tensor) -> torch.Tensor:
    """Which pairs' swaps a repair accepts (besides lowering the pair's maximum)."""
    hot_total, cold_total = best.hot_total, best.cold_total
    over = hot_total > limit
    within = (hot_total + cold_total) / 2 + best.value <= limit
    # Only full fixes: a swap that leaves its hot rank above the limit
    # costs two slots and still needs another; the open search
    # handles the ranks no partner can fix.
    accept = over & within
    # The row's peak stays at least the hottest rank's load after its
    # trade: trading on ranks already below that buys nothing.
    top = hot_total[:, :1]
    floor = torch.where(accept[:, :1], (top + cold_total[:, :1]) / 2 + best.value[:, :1], top)
    accept[:, 1:] &= hot_total[:, 1:] > floor
    return accept


def _apply_swaps(work: torch.Tensor, pairing: _Pairing, best: _Swaps, accept: torch.Tensor) -> None:
    """Make the accepted swaps in ``work``, in place."""
    rows, _, slots = work.shape
    hot, cold = pairing
    pairs = hot.shape[1]
    in_pair = torch.arange(pairs) * slots
    give, take = best.choice // slots, best.choice % slots
    hot_expert = best.items[:, :pairs].reshape(rows, -1).gather(1, give + in_pair)
    cold_expert = best.items[:, pairs:].reshape(rows, -1).gather(1, take + in_pair)
    flat = work.view(rows, -1)
    flat.scatter_(
        1,
        torch.cat([hot * slots + give, cold * slots + take], dim=1),
        torch.cat(
            [
                torch.where(accept, cold_expert, hot_expert),
                torch.where(accept, hot_expert, cold_expert),
            ],
            dim=1,
        ),
    )


def fix_duplicates(placed: torch.Tensor, replica_load: torch.Tensor, max_rounds: int) -> None:
    """Swap second copies of an expert on one rank away, in place, one per row per round.

    Each duplicate is exchanged with the replica elsewhere whose load is
    closest, among those whose rank lacks the expert and whose expert is not
    on the duplicate's rank. Stops when no row has a fixable duplicate.
    """
    num_rows, num_ranks, slots = placed.shape
    if slots < 2 or num_ranks < 2:
        return
    flat = placed.view(num_rows, num_ranks * slots)
    rows = torch.arange(num_rows)
    stuck = torch.zeros(num_rows, dtype=torch.bool)
    for _ in range(max_rounds):
        duplicate = repeats(placed).view(num_rows, -1) & ~stuck.unsqueeze(1)
        has = duplicate.any(dim=1)
        if not bool(has.any()):
            return
        slot = torch.argmax(duplicate.to(torch.int8), dim=1)
        rank = slot // slots
        dup_expert = flat[rows, slot]
        own = placed[rows, rank]
        rank_has_expert = (placed == dup_expert.view(-1, 1, 1)).any(dim=2)
        on_own = (placed.unsqueeze(3) == own.view(num_rows, 1, 1, slots)).any(dim=3)
        ok = ~on_own & ~rank_has_expert.unsqueeze(2)
        ok[rows, rank] = False
        item = replica_load.gather(1, flat)
        cost = (item - item[rows, slot].unsqueeze(1)).abs()
        best_cost, partner = cost.masked_fill(~ok.view(num_rows, -1), math.inf).min(dim=1)
        apply = has & torch.isfinite(best_cost)
        stuck |= has & ~apply
        partner_expert = flat[rows, partner]
        flat[rows, slot] = torch.where(apply, partner_expert, dup_expert)
        flat[rows, partner] = torch.where(apply, dup_expert, partner_expert)
