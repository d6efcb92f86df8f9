"""Migration-aware rebalancing: keep the current placement and repair it with few targeted swaps.

The published DeepSeek algorithm recomputes the placement from scratch, so a
rebalance after a small drift in load rewrites most slots (each rewritten slot
is one expert's weights sent over the network). This policy starts from the
current placement and changes only what buys balance.

Terms: a *row* is one independent packing problem - a layer (global variant)
or a (layer, node) pair (hierarchical variant) - with ``K`` ranks of ``S``
slots and ``n`` experts. An expert with ``c`` replicas puts ``load / c`` on
every rank holding one (dispatch splits its tokens evenly). ``LB`` is the
row's lower bound on the max rank load, ``max(row load / K, p*)``, with ``p*``
the smallest achievable hottest-replica load (D'Hondt apportionment, at most
one replica per rank; see ``_bounds``). A layer's *target* is
``U = (1 + tolerance / S**2) * max(LB over the layer's rows)``.

**The knobs.** ``tolerance`` (default ``0.1``) sets how close to the bound a
repair goes before it stops trading slots for balance; it is counted in units
of ``rank load / S**2`` (one slot's mean load over ``S``: the typical step one
swap between replicas of neighbouring size makes), i.e. 0.12 % of the bound
with 9 slots per rank, 0.4 % with 5. Larger moves fewer slots for less
balance (``benchmarks/bench_policy.py --plot`` draws the trade-off).
``replan_gain`` (default ``0.015``): moving whole expert groups to other
nodes is worth it only when it lowers the peak by more than this fraction (it
moves most of a row's slots), and a repair that stays this far above the
bound is tried again with the heavy-replica limit (step 5). At ``0.01``, a 0.2
lognormal drift on DeepSeek-V3 288x32 (lognormal 0.5 loads) moved 25 % of
the slots, mostly whole groups between nodes, for 0.2 % more balancedness
than at ``0.015`` (20 % moved). ``fresh_gain`` (default ``0.05``): a row
whose repair stays above the bound is replaced by a from-scratch plan only
when that lowers its peak by more than this fraction; the fresh plan moves
nearly all of the row's slots, the repair a quarter or less. At ``0.015``
(the old rule, tied to ``replan_gain``), Zipf 1.1 loads on DeepSeek-V3
320x64/global moved 46.7 % of the slots after a 0.2 drift for 0.9948
balancedness, at ``0.05`` 37.6 % for 0.9892 (deepseek: 0.9556); on the
next window's loads the two placements realise 0.7786 and 0.7814. ``max_rounds``
(default 16) bounds the swap rounds and so the time.

With a usable old placement (same ``[layers, physical]`` shape), per row:

0. **Settled rows.** A row whose old placement is complete (no free slot,
   every expert placed, no avoidable second copy on a rank) and whose
   hottest rank is already within ``U`` on the new loads keeps it untouched:
   nothing below runs for it, and no slot moves.
1. **Keep.** Project the old placement; a second copy of an expert on one
   rank (it splits nothing) and, hierarchically, an expert outside its
   group's node become free slots.
2. **Re-apportion minimally.** Every expert gets at least
   ``ceil(load / ((1 + tolerance / S**2) p*))`` replicas; starting from the
   old counts only those raises are made, and as many replicas are given back
   where that raises the hottest-replica load least, from the hottest ranks.
   (Raising only replicas above ``U / 2`` saved about one point of moved
   slots but left heating experts short of replicas: the next window's
   balancedness fell by up to 3 %.)
3. **Fill** the freed slots with the added replicas: heaviest first, round
   robin over the ranks with free slots, lightest rank first.
4. **Repair** with the economical swap search (below) until every rank is at
   most ``U``.
5. **Retry** a row whose repaired peak stays more than ``replan_gain`` above
   the bound with at most one *heavy* replica per rank (below), if its counts
   have more heavy ones than ranks: re-apportioned to those counts, filled
   and repaired again from the old placement, kept if the peak is lower.
6. **Fall back** to a from-scratch plan for a row whose peak still stays
   more than ``fresh_gain`` above the bound and that the fresh plan beats by
   more than ``fresh_gain`` (or, never in practice, that keeps a duplicate).
   Ranks are interchangeable within a row, so the fresh plan's ranks are
   matched to the old ones: in rounds, each claims the old rank holding most
   of its experts, and each old rank takes its strongest claimant.

Without a usable old placement every row gets a **fresh plan**: capped
D'Hondt counts, replicas sorted by load (numpy's sort: several times faster
than torch's on CPU) and dealt in rounds of ``K`` (each round's heaviest
replica to the lightest rank, never onto a rank that holds the expert), then
*paired* swap rounds (at most 6, fewer if ``max_rounds`` says so) aiming
four times closer to the bound: every round sorts
each row's ranks by load and pairs the i-th heaviest with the i-th lightest
(shifted by the round number modulo 4, so a hot rank meets several
partners); each pair makes the one swap that evens the two loads most, if it
lowers the pair's maximum and puts no expert on a rank that holds it. A row
retires once within its target or after 4 rounds without a swap. A row that
ends more than 1 % above its target is planned again with at most one heavy
replica per rank, and keeps the better plan.

*Heavy replicas.* A replica is heavy when two of them on one rank, with the
rank's other ``S - 2`` slots holding replicas of the mean load of the
``K (S - 2)`` lightest, exceed the target. D'Hondt counts can make more heavy
replicas than ranks (Zipf loads: dozens of replicas of a few hot experts,
each near ``p*``); then no packing reaches the target. The excess is
removed from the heavy experts whose replicas stay lightest after the
removal (in practice those with the most replicas) and given to light
experts by D'Hondt, unless that would make some replica heavier than the
target.

**Repair search.** Paired rounds first (economical: only ranks above the
target trade, and only by swaps that bring both ranks of the pair within it -
a swap that leaves its hot rank above the target costs two slots and still
needs another; while the row's hottest rank finds no such swap, no other
rank trades, since the row's peak would not drop), then the open search
below for the rows still above target. Finally every
replica that stays on its rank is put back into its old slot
(``preserve_intra_rank_slots``).

*Open search.* Swapping two replicas never changes the multiset of replica
loads, so they are sorted by load once. For every rank over the
limit (all at once) and each replica ``a`` on it, the partner replica ``b`` is
found anywhere in the row with one binary search: the largest ``b`` that
brings the hot rank to the limit while its own rank stays within it (a best
fit; a running maximum of ``load(b) + room(rank of b)`` answers "does any
``b`` fit"), else the ``b`` that lowers the hot rank most. Each hot rank
gives away the replica whose trade scores best: full fixes score between 1
and 2 (the closer the fit, the higher), partial ones below 1 (the larger
the drop, the higher), and every slot the trade refetches beyond those it
hands back to a rank that held them before the repair costs
``_OPEN_COST_WEIGHT`` (a replica that only arrived in this repair costs
nothing to send on; at equal balance this moved 1.4-2.9 points fewer slots
on DeepSeek-V3 320x64/global and 1.3-1.9 on six of seven 288x32/global
workloads after a 0.2 drift). Claimants of one partner rank trade hottest
first while their trades fit its room. No trade puts an expert on a rank
that holds it. A trade on a rank that stays below the hottest rank's level
anyway is skipped (it would cost two slots for nothing). A row whose
hottest rank finds no trade at all relaxes its limit halfway to that rank's
load.

**Hierarchical variant** (``num_groups % num_nodes == 0``, as in the DeepSeek
policy): whole expert groups stay on one node and every replica on its
group's node, so group-limited routing keeps its locality. Groups go to nodes
by exhaustive search over all layouts when there are at most 5000 (8 groups
on 4 nodes: 105 partitions, 2520 labelled layouts), else by dealing plus the
swap search. An old layout is kept while its heaviest node is within
``replan_gain`` of the best; otherwise the layout within ``replan_gain`` of
the best that leaves the most groups on their node is taken.

Everything runs under ``torch.inference_mode()``, batched over rows with
tensor operations; Python loops run over rounds only (swap rounds, dealing
rounds, rank-matching rounds), never over experts. The result depends only
on the inputs (deterministic sorts; ties otherwise broken by index).
"""

from __future__ import annotations

import functools
import importlib
import math
from types import ModuleType
from typing import Final

import attrs
import torch

from moe_protocols._torch_typed import from_numpy
from moe_protocols.eplb import _limits
from moe_protocols.eplb._deepseek import preserve_intra_rank_slots
from moe_protocols.errors import PolicyError

__all__ = ["MigrationAwarePolicy", "replica_counts"]

_NAME: Final = "migration_aware"
# Improvements smaller than this fraction of the target are float noise.
_EPS: Final = 1e-9
# Paired rounds shift the pairing through this many partners before a row
# that makes no swap gives up.
_SHIFTS: Final = 4
# Candidate partners examined for a best fit, below the largest that could do.
_FIT_WINDOW: Final = 4
# A from-scratch plan aims this much closer to the bound than a repair: it has
# no slots to save by stopping early, only time.
_FRESH_SHARE: Final = 0.25
# Paired rounds of a fresh plan, at most: on DeepSeek-V3 shapes rounds 7-16
# added 0.02-0.3 % balancedness for about half of a fresh plan's time.
_FRESH_ROUNDS: Final = 6
# Open-search trades are scored by fit (full fixes between 1 and 2, partial
# ones below 1) minus this much per slot a trade refetches beyond those it
# returns to an old holder: of two equally good fixes, the one that refetches
# no new slot wins by 0.5 over one that refetches two.
_OPEN_COST_WEIGHT: Final = 0.25
# Largest number of group-to-node layouts searched exhaustively.
_MAX_LAYOUTS: Final = 5000
# A fresh plan more than this fraction above its target is retried with at
# most one heavy replica per rank (see ``_limit_heavy_replicas``).
_RETRY_ABOVE: Final = 0.01


def _load_numpy() -> ModuleType | None:
    # Optional: numpy only speeds up one sort; torch's sort is the fallback.
    try:
        return importlib.import_module("numpy")
    except ImportError:  # pragma: no cover - depends on the environment
        return None


_NUMPY: Final = _load_numpy()


def _check_tolerance(instance: object, attribute: attrs.Attribute[float], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise PolicyError(
            f"MigrationAwarePolicy.{attribute.name} must be a finite number >= 0, got {value!r}"
        )


def _check_fraction(instance: object, attribute: attrs.Attribute[float], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise PolicyError(
            f"MigrationAwarePolicy.{attribute.name} must be a number in [0, 1], got {value!r}"
        )


def _check_rounds(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PolicyError(
            f"MigrationAwarePolicy.{attribute.name} must be an int >= 0, got {value!r}"
        )


# --------------------------------------------------------------------------- counts


@functools.lru_cache(maxsize=64)
def _dhondt_candidates(n: int, extra: int, cap: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The quotients D'Hondt can pick: ``(experts to consider, owner [C], divisor [C])``.

    Only the ``extra`` heaviest experts can get an extra replica, and the
    ``i``-th heaviest (from 0) gets at most ``extra // (i + 1)`` (every heavier
    expert gets at least as many), so about ``extra * ln(extra)`` candidates
    suffice instead of ``extra * cap``.
    """
    heavy = min(n, extra)
    owners: list[int] = []
    divisors: list[int] = []
    for i in range(heavy):
        depth = min(extra // (i + 1), cap - 1)
        owners += [i] * depth
        divisors += range(1, depth + 1)
    return (
        heavy,
        torch.tensor(owners, dtype=torch.int64),
        torch.tensor(divisors, dtype=torch.float64),
    )


def replica_counts(
    load: torch.Tensor, num_slots: int, max_per_expert: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """D'Hondt replica counts with a cap, and the hottest-replica load they achieve.

    Minimises ``max_e load[e] / count[e]`` subject to ``count >= 1``,
    ``count <= max_per_expert`` and ``sum(count) == num_slots``: each extra
    replica goes to the expert with the largest load per replica.

    Args:
        load: ``[X, n]`` non-negative float loads, one row per problem.
        num_slots: replicas per row; ``n <= num_slots <= n * max_per_expert``.
        max_per_expert: cap on one expert's replicas (the ranks of the row).

    Returns:
        ``(count [X, n] int64, hottest [X] float64)``.

    Raises:
        PolicyError: (a ``ValueError``) no such counts exist, or ``num_slots``
            exceeds ``MAX_PHYSICAL_SLOTS``.
    """
    num_rows, n = load.shape
    _limits.check_count("num_slots", num_slots, "MAX_PHYSICAL_SLOTS", PolicyError)
    extra = num_slots - n
    if extra < 0 or num_slots > n * max_per_expert:
        raise PolicyError(
            f"cannot place {num_slots} replicas of {n} experts with at most {max_per_expert} each"
        )
    count = torch.ones(num_rows, n, dtype=torch.int64)
    if extra > 0:
        heavy, owner, divisor = _dhondt_candidates(n, extra, max_per_expert)
        heaviest = torch.topk(load, heavy, dim=1).indices
        # Candidate c: the (divisor[c] + 1)-th replica of the owner[c]-th heaviest
        # expert, ranked by the load per replica before adding it.
        quotient = load.gather(1, heaviest)[:, owner] / divisor
        chosen = torch.topk(quotient, extra, dim=1).indices
        added = torch.zeros(num_rows, heavy, dtype=torch.int64)
        added.scatter_add_(1, owner[chosen], torch.ones_like(chosen))
        count.scatter_add_(1, heaviest, added)
    return count, (load / count).amax(dim=1)


def _cap(num_slots: int, num_experts: int, num_ranks: int) -> int:
    """Most replicas per expert: one per rank, unless the slots force more."""
    return max(num_ranks, -(-num_slots // num_experts))


def _smallest_mask(values: torch.Tensor, how_many: torch.Tensor) -> torch.Tensor:
    """Mask of the ``how_many[x]`` smallest entries of each row of ``[X, m]``."""
    k = int(how_many.max())
    mask = torch.zeros_like(values, dtype=torch.bool)
    if k > 0:
        index = torch.topk(values, k, dim=1, largest=False).indices
        mask.scatter_(1, index, torch.arange(k).unsqueeze(0) < how_many.unsqueeze(1))
    return mask


def _repair_counts(
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
        chosen = _smallest_mask(cost.flatten(1), surplus.clamp(min=0)).view(cost.shape)
        count = count - (chosen & removable).sum(dim=2)
    if bool((surplus < 0).any()):
        depth = int((-surplus).max())
        # Adding the t-th extra replica: D'Hondt, largest load / (count + t) first.
        before = count.unsqueeze(2) + torch.arange(depth)
        addable = before < cap
        gain = (-load.unsqueeze(2) / before).masked_fill(~addable, math.inf)
        chosen = _smallest_mask(gain.flatten(1), (-surplus).clamp(min=0)).view(gain.shape)
        count = count + (chosen & addable).sum(dim=2)
    return count


# --------------------------------------------------------------------------- packing


def _expand(expert: torch.Tensor, count: torch.Tensor, width: int) -> torch.Tensor:
    """Repeat ``expert[x, i]`` ``count[x, i]`` times, in order: ``[X, width]``."""
    start = count.cumsum(dim=1) - count
    marker = torch.zeros(expert.shape[0], width + 1, dtype=torch.int64)
    marker.scatter_add_(1, start.clamp(max=width), torch.ones_like(start))
    return expert.gather(1, marker[:, :width].cumsum(dim=1) - 1)


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


def _pair_search(
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
    num_rows, num_ranks, slots = placed.shape
    result = placed.clone()
    if num_ranks < 2 or max_rounds == 0 or num_rows == 0:
        return result
    num_experts = per_replica.shape[1]
    pairs = num_ranks // 2
    # float32 is exact enough to pick swaps and halves the work of the big tensors.
    scale = per_replica.amax(dim=1, keepdim=True).clamp(min=1e-300)
    weight = (per_replica / scale).to(torch.float32)
    limit = (target.unsqueeze(1) / scale).to(torch.float32) * (1 + 1e-6)
    active = torch.arange(num_rows)
    work = placed.clone()
    rank_offset = torch.arange(num_ranks).unsqueeze(1) * num_experts
    in_pair = torch.arange(pairs) * slots
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
            rows = work.shape[0]
        order = torch.sort(rank_load, dim=1, descending=True, stable=True).indices
        hot = order[:, :pairs]
        # Round t pairs the i-th heaviest with the (i + t mod 4)-th lightest, so a
        # hot rank that cannot trade with one partner meets others.
        cold = order[:, num_ranks - pairs :].flip(1).roll(-(round_ % shifts), dims=1)
        index = torch.cat([hot, cold], dim=1).unsqueeze(2).expand(-1, -1, slots)
        items = work.gather(1, index)
        loads = slot_load.gather(1, index)
        totals = rank_load.gather(1, index[:, :, 0])
        hot_total, cold_total = totals[:, :pairs], totals[:, pairs:]
        # present[x, k * n + e]: rank k holds expert e.
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
        best, choice = miss.abs_().view(rows, pairs, slots * slots).min(dim=2)
        half = half_gap.view(rows, pairs)
        accept = best < half * (1 - 1e-6)  # the pair's maximum drops
        if economical:
            over = hot_total > limit
            within = (hot_total + cold_total) / 2 + best <= limit
            # Only full fixes: a swap that leaves its hot rank above the limit
            # costs two slots and still needs another; the open search
            # handles the ranks no partner can fix.
            accept &= over & within
            # The row's peak stays at least the hottest rank's load after its
            # trade: trading on ranks already below that buys nothing.
            top = hot_total[:, :1]
            floor = torch.where(accept[:, :1], (top + cold_total[:, :1]) / 2 + best[:, :1], top)
            accept[:, 1:] &= hot_total[:, 1:] > floor
        stalled = torch.where(accept.any(dim=1), 0, stalled + 1)
        give, take = choice // slots, choice % slots
        hot_expert = items[:, :pairs].reshape(rows, -1).gather(1, give + in_pair)
        cold_expert = items[:, pairs:].reshape(rows, -1).gather(1, take + in_pair)
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
    result[active] = work
    return result


def _holding(origin: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[X, K, S]`` old placement (``-1`` free) -> ``[X, K * n]``: rank ``k`` held expert ``e``."""
    num_rows, num_ranks, _slots = origin.shape
    offset = (torch.arange(num_ranks) * (num_experts + 1)).view(1, -1, 1)
    held = torch.zeros(num_rows, num_ranks * (num_experts + 1), dtype=torch.bool)
    index = (torch.where(origin >= 0, origin, num_experts) + offset).view(num_rows, -1)
    held.scatter_(1, index, True)
    return held.view(num_rows, num_ranks, num_experts + 1)[:, :, :num_experts].reshape(num_rows, -1)


def _slack_search(
    placed: torch.Tensor,
    weight: torch.Tensor,
    expert: torch.Tensor,
    num_experts: int,
    target: torch.Tensor,
    max_rounds: int,
    held: torch.Tensor | None = None,
) -> None:
    """Lower every rank above ``target`` by swaps with ranks that have room, in place.

    Open rounds: every rank over the limit looks for its best partner replica
    anywhere in the row, and the claimants of one rank share its room,
    hottest first. A trade keeps the partner within the limit and never puts
    an expert on a rank that holds it. Every trade costs two slots, so none
    is made on a rank that stays below the hottest rank's level anyway.

    Args:
        placed: ``[X, K, S]`` replica (index into ``weight``) in each slot.
        weight: ``[X, Q]`` replica loads, non-decreasing along each row.
        expert: ``[X, Q]`` expert of each replica, ids in ``[0, num_experts)``.
        num_experts: ``n``.
        target: ``[X]`` load a rank may have; a row whose hottest rank finds
            no trade at all relaxes it halfway to that rank's load.
        max_rounds: bound on rounds.
    """
    num_rows, num_ranks, slots = placed.shape
    if num_ranks < 2 or slots < 1 or max_rounds == 0:
        return
    search = _Search(
        placed.view(num_rows, -1), num_ranks, weight, expert, num_experts, target, held
    )
    for _ in range(max_rounds):
        if not search.narrow():
            break
        search.open_round()
    search.write_back()


@functools.lru_cache(maxsize=8)
def _fit_codes(width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tables for ``width``-bit codes (shared, read only).

    Returns ``([W] bit values, [2**W] bits set, [2**W * W] position of the
    (t + 1)-th set bit at ``code * W + t``, 0 past the last)``.
    """
    codes = torch.arange(2**width)
    bits = 2 ** torch.arange(width)
    is_set = (codes.unsqueeze(1) & bits) > 0
    # The j-th bit, if set, is the (seen[j] + 1)-th; unset bits write 0 to the
    # last column, which a set bit reaches only when all are set.
    seen = is_set.cumsum(dim=1) - 1
    position = torch.arange(width).expand_as(seen)
    nth = torch.zeros(2**width, width, dtype=torch.int64)
    nth.scatter_(1, torch.where(is_set, seen, width - 1), torch.where(is_set, position, 0))
    return bits, is_set.sum(dim=1), nth.flatten()


@functools.lru_cache(maxsize=64)
def _hot_order(num_hot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``([H] 0..H-1, [H, H] i after j, [H, H] i after or at j)`` for ``H`` hot ranks (shared)."""
    order = torch.arange(num_hot)
    before = torch.ones(num_hot, num_hot, dtype=torch.bool).tril(diagonal=-1)
    return order, before, before | torch.eye(num_hot, dtype=torch.bool)


class _Search:
    """Working tensors of one slack search, narrowed to rows with a rank over their limit.

    An open round is about a hundred small tensor operations of a few
    microseconds each; the two binary searches and the running maximum over
    ``[A, Q]`` cost the most. So a round costs nearly as much for a few rows
    as for many, and each operation saved counts in every round.
    """

    def __init__(
        self,
        out: torch.Tensor,
        num_ranks: int,
        weight: torch.Tensor,
        expert: torch.Tensor,
        num_experts: int,
        target: torch.Tensor,
        held: torch.Tensor | None = None,
    ) -> None:
        num_rows, num_slots = out.shape
        self.held = held  # [A, K * n] old placement, or None (no migration cost)
        self.out = out  # [X, Q] the caller's placement, written back on narrowing
        self.num_ranks = num_ranks
        self.slots = num_slots // num_ranks
        self.num_slots = num_slots
        self.num_experts = num_experts
        self.active = torch.arange(num_rows)  # [A] caller's row of each working row
        self.flat = out.clone()  # [A, Q] replica in each slot
        self.weight = weight  # [A, Q] ascending
        self.expert = expert  # [A, Q]
        # position[x, r]: slot of replica r (the inverse of flat).
        slot = torch.arange(num_slots).expand(num_rows, -1)
        self.position = torch.empty_like(out).scatter_(1, out, slot)  # [A, Q]
        self.rank_of = self.position // self.slots  # [A, Q]
        self.rank_load = weight.gather(1, out).view(num_rows, num_ranks, -1).sum(dim=2)  # [A, K]
        # present[x, k * n + e]: rank k of row x holds a replica of expert e.
        self.present = torch.zeros(num_rows, num_ranks * num_experts, dtype=torch.bool)
        self.present.scatter_(1, self.rank_of * num_experts + expert, True)
        self.limit = target.unsqueeze(1).clone()  # [A, 1]
        self.over = self.rank_load > self.limit * (1 + _EPS)  # [A, K], kept by narrow()
        self.in_rank = torch.arange(self.slots)
        self.window = torch.arange(min(_FIT_WINDOW, num_slots))
        self.bits, self.fit_count, self.nth_fit = _fit_codes(self.window.numel())

    def write_back(self) -> None:
        self.out[self.active] = self.flat

    def narrow(self) -> bool:
        """Drop rows with nothing over the limit; False when none is left."""
        self.over = self.rank_load > self.limit * (1 + _EPS)
        busy = self.over.any(dim=1)
        if bool(busy.all()):
            return True
        self.write_back()
        keep = busy.nonzero().squeeze(1)
        for name in (
            "active",
            "flat",
            "weight",
            "expert",
            "position",
            "rank_of",
            "rank_load",
            "present",
            "limit",
            "over",
        ):
            setattr(self, name, getattr(self, name)[keep])
        if self.held is not None:
            self.held = self.held[keep]
        return keep.numel() > 0

    def open_round(self) -> None:
        num_rows = self.flat.shape[0]
        slots = self.slots
        # The hot ranks, hottest first; at most half the ranks (the rest are partners).
        num_hot = min(int(self.over.sum(dim=1).max()), self.num_ranks // 2)
        hot_load, hot = torch.topk(self.rank_load, num_hot, dim=1)
        own = self.flat.gather(1, (hot.unsqueeze(2) * slots + self.in_rank).flatten(1))
        a = self.weight.gather(1, own)  # [A, H * S]
        by_rank = (num_rows, num_hot, slots)
        room_of_rank = self.limit - self.rank_load
        # key[b] >= a  <=>  b's rank stays within the limit after trading b for a.
        # Stored after W entries of -inf: the window below the first replica reads them.
        width = self.window.numel()
        padded = self.weight.new_full((num_rows, width + self.num_slots), -math.inf)
        key = padded[:, width:]
        torch.add(self.weight, room_of_rank.gather(1, self.rank_of), out=key)
        need = hot_load - self.limit  # [A, H]
        over = self.over.gather(1, hot).unsqueeze(2)  # [A, H, 1]
        order, before, upto = _hot_order(num_hot)
        # Full fix, best fit: the largest b <= a - need (the hot rank reaches the
        # limit) whose rank has room for a - b, among the few largest such b;
        # failing that, the b whose rank keeps the most room. The binary
        # searches cost mostly mispredicted branches: padding entries (ranks
        # not over the limit) search a constant instead, which costs next to nothing.
        wanted = torch.where(over, a.view(by_rank) - need.unsqueeze(2), -math.inf)
        end = torch.searchsorted(self.weight, wanted.view(num_rows, -1), right=True).sub_(1)
        # Candidates end, end - 1, ..., end - W + 1 (as indices into padded).
        near = (end + width).unsqueeze(2) - self.window
        fits = padded.gather(1, near.flatten(1)).view(near.shape) >= a.unsqueeze(2)
        # Which of the W candidates fit, as a W-bit code (bit j: candidate end - j).
        code = (fits * self.bits).sum(dim=2)
        fitting = code > 0
        # Hot ranks with similar needs would all pick the same best fit; the
        # i-th hottest takes the (i mod f)-th of its f fits, so they spread.
        total = self.fit_count.take(code)
        turn = (order.view(1, -1, 1) % total.view(by_rank).clamp(min=1)).view(num_rows, -1)
        nearest = end - self.nth_fit.take(code * width + turn)
        running_max, running_at = torch.cummax(key, dim=1)
        last = end.clamp(min=0)
        anywhere = (end >= 0) & (running_max.gather(1, last) >= a)
        # Partial fix: the smallest b that fits (the largest drop of the hot rank).
        # Every partner picked below has key >= a (a fitting b, or where the
        # running maximum of key reaches a), except where no b fits at all.
        has_room = fitting | anywhere
        searched = torch.where(over & ~has_room.view(by_rank), a.view(by_rank), math.inf)
        first = torch.searchsorted(running_max, searched.view(num_rows, -1))
        has_partner = has_room | (first < self.num_slots)
        partner = torch.where(
            fitting,
            nearest,
            torch.where(anywhere, running_at.gather(1, last), first.clamp_(max=self.num_slots - 1)),
        )
        b = self.weight.gather(1, partner)
        partner_rank = self.rank_of.gather(1, partner)
        n = self.num_experts
        own_expert = self.expert.gather(1, own)
        partner_expert = self.expert.gather(1, partner)
        # The partner rank holds the expert brought, or the hot rank the one taken.
        clash = self.present.gather(1, partner_rank * n + own_expert)
        clash |= self.present.gather(
            1, ((hot * n).unsqueeze(2) + partner_expert.view(by_rank)).view(num_rows, -1)
        )
        ok = (has_partner & (b < a) & ~clash).view(by_rank).logical_and_(over)
        gain = a - b
        score = torch.where(
            has_room,
            2 - (gain.view(by_rank) - need.unsqueeze(2)).view(num_rows, -1) / self.limit,
            (gain.view(by_rank) / need.unsqueeze(2)).view(num_rows, -1),
        )
        if self.held is not None:
            held = self.held
            hot_slot = (hot * n).unsqueeze(2).expand(by_rank).reshape(num_rows, -1)
            fresh = [
                ~held.gather(1, index)
                for index in (
                    hot_slot + partner_expert,
                    partner_rank * n + own_expert,
                    hot_slot + own_expert,
                    partner_rank * n + partner_expert,
                )
            ]
            cost = (fresh[0].to(score.dtype) + fresh[1]) - (fresh[2].to(score.dtype) + fresh[3])
            score = score - cost * _OPEN_COST_WEIGHT
        best, which = torch.where(ok, score.view(by_rank), -math.inf).max(dim=2)
        accept = best > -math.inf
        pick = which + order * slots  # [A, H] index into [A, H * S]
        chosen_partner = partner.gather(1, pick)
        chosen = partner_rank.gather(1, pick)
        if num_hot > 1:
            # Claimants of one partner rank trade, hottest first, while what they
            # bring fits its room, they take different replicas and bring
            # different experts; the rest wait for the next round.
            delta = gain.gather(1, pick)
            shared = (chosen.unsqueeze(2) == chosen.unsqueeze(1)) & accept.unsqueeze(1)
            claimed = ((shared & upto) * delta.unsqueeze(1)).sum(dim=2)
            accept &= claimed <= room_of_rank.gather(1, chosen)
            bringing = own_expert.gather(1, pick)
            clash = (chosen_partner.unsqueeze(2) == chosen_partner.unsqueeze(1)) | (
                bringing.unsqueeze(2) == bringing.unsqueeze(1)
            )
            accept &= ~(shared & before & clash).any(dim=2)
            # The row's peak stays at least the hottest rank's load after its
            # best trade: trading on ranks already below that buys nothing.
            floor = hot_load[:, :1] - torch.where(accept[:, :1], delta[:, :1], 0.0)
            accept[:, 1:] &= hot_load[:, 1:] > floor
        # A row whose hottest rank found no trade at all relaxes its limit halfway to that rank.
        stuck = over[:, :1, 0] & ~accept[:, :1]
        self.limit = torch.where(stuck, self.limit + (hot_load[:, :1] - self.limit) / 2, self.limit)
        if bool(accept.any()):
            self.swap(accept, hot, own.gather(1, pick), chosen, chosen_partner)

    def swap(
        self,
        accept: torch.Tensor,
        giver: torch.Tensor,
        item_a: torch.Tensor,
        taker: torch.Tensor,
        item_b: torch.Tensor,
    ) -> None:
        """Trade replica ``item_a`` of rank ``giver`` for ``item_b`` of ``taker`` where accepted."""
        row, pair = accept.nonzero(as_tuple=True)
        item_a, item_b = item_a[row, pair], item_b[row, pair]
        rank_a, rank_b = giver[row, pair], taker[row, pair]
        slot_a, slot_b = self.position[row, item_a], self.position[row, item_b]
        self.flat[row, slot_a] = item_b
        self.flat[row, slot_b] = item_a
        self.position[row, item_a] = slot_b
        self.position[row, item_b] = slot_a
        self.rank_of[row, item_a] = rank_b
        self.rank_of[row, item_b] = rank_a
        moved = self.weight[row, item_a] - self.weight[row, item_b]
        # Several givers may trade with one taker: accumulate.
        self.rank_load.index_put_((row, rank_a), -moved, accumulate=True)
        self.rank_load.index_put_((row, rank_b), moved, accumulate=True)
        expert_a, expert_b = self.expert[row, item_a], self.expert[row, item_b]
        n = self.num_experts
        self.present[row, rank_a * n + expert_a] = False
        self.present[row, rank_b * n + expert_b] = False
        self.present[row, rank_a * n + expert_b] = True
        self.present[row, rank_b * n + expert_a] = True


def _repeats(placed: torch.Tensor) -> torch.Tensor:
    """``[X, K, S]`` -> mask of slots whose expert an earlier slot of the same rank holds."""
    slots = placed.shape[2]
    earlier = torch.ones(slots, slots, dtype=torch.bool).tril(diagonal=-1)
    return ((placed.unsqueeze(3) == placed.unsqueeze(2)) & earlier).any(dim=3)


def _fix_duplicates(placed: torch.Tensor, replica_load: torch.Tensor, max_rounds: int) -> None:
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
        duplicate = _repeats(placed).view(num_rows, -1) & ~stuck.unsqueeze(1)
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


@attrs.frozen
class _Rows:
    """A batch of packing problems: ``X`` rows of ``n`` experts onto ``K`` ranks of ``S`` slots."""

    load: torch.Tensor  # [X, n] float64
    num_ranks: int
    slots: int
    rows_per_layer: int

    @property
    def num_slots(self) -> int:
        return self.num_ranks * self.slots

    @property
    def cap(self) -> int:
        return _cap(self.num_slots, self.load.shape[1], self.num_ranks)

    def target(self, hottest: torch.Tensor, tolerance: float) -> torch.Tensor:
        """``[X]`` the layer's ``(1 + tolerance) * max LB`` for every row."""
        bound = torch.maximum(self.load.sum(dim=1) / self.num_ranks, hottest)
        per_layer = bound.view(-1, self.rows_per_layer).amax(dim=1, keepdim=True)
        return per_layer.expand(-1, self.rows_per_layer).reshape(-1) * (1 + tolerance)


def _search_and_read(
    placed_slots: torch.Tensor,
    slot_load: torch.Tensor,
    num_experts: int,
    target: torch.Tensor,
    max_rounds: int,
    held: torch.Tensor | None = None,
) -> torch.Tensor:
    """Slack-search a ``[X, K, S]`` placement of expert ids; returns the improved one.

    ``held`` (``[X, K * n]``, see :func:`_holding`): the placement before the
    repair, so trades that refetch fewer slots are preferred; ``None`` for
    fresh plans.
    """
    num_rows = placed_slots.shape[0]
    flat = placed_slots.view(num_rows, -1)
    order = torch.sort(slot_load, dim=1, stable=True).indices
    weight = slot_load.gather(1, order)
    expert = flat.gather(1, order)
    item_of_slot = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1]).expand(num_rows, -1)
    )
    placed = item_of_slot.view(placed_slots.shape).contiguous()
    _slack_search(placed, weight, expert, num_experts, target, max_rounds, held)
    return expert.gather(1, placed.view(num_rows, -1)).view(placed_slots.shape)


def _descending_order(values: torch.Tensor) -> torch.Tensor:
    """``[X, m]`` -> indices sorting each row descending (deterministic)."""
    if _NUMPY is not None and values.device.type == "cpu":
        # numpy's sort is several times faster than torch's on CPU for short
        # rows; both are stable, so ties keep index order and the two paths
        # give the same placement whether or not numpy is installed.
        array = values.detach().numpy()
        return from_numpy(_NUMPY.argsort(-array, axis=1, kind="stable"))
    return torch.sort(values, dim=1, descending=True, stable=True).indices


def _limit_heavy_replicas(
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
    order = _descending_order(-per_replica)
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
    taken = _smallest_mask(cost.masked_fill(~removable, math.inf).flatten(1), excess)
    given = _smallest_mask(gain.flatten(1), excess)
    taken_count = taken.view(cost.shape).sum(dim=2)
    given_count = given.view(gain.shape).sum(dim=2)
    return count.scatter_add(1, heavy.indices, -taken_count).scatter_add(1, light, given_count)


def _fresh(rows: _Rows, tolerance: float, max_rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
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
        spread = _limit_heavy_replicas(load[far], count[far], target[far], rows.num_ranks, rows.cap)
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
    order = _descending_order(per_replica)
    expert_desc = _expand(order, count.gather(1, order), num_slots)
    dealt = _deal(expert_desc, per_replica.gather(1, expert_desc), num_ranks)
    placed = expert_desc.gather(1, dealt.flatten(1)).view(dealt.shape)
    placed = _pair_search(placed, per_replica, target, max_rounds, economical=False)
    peak = per_replica.gather(1, placed.flatten(1)).view(placed.shape).sum(dim=2).amax(dim=1)
    return placed, peak


def _first_copies(placed: torch.Tensor) -> torch.Tensor:
    """``[X, K, S]`` -> a copy with every repeat of an expert within a rank turned into ``-1``."""
    return placed.masked_fill(_repeats(placed), -1)


def _counts_of(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[X, Q]`` expert ids (``-1`` = free) -> ``[X, n]`` replicas per expert."""
    counts = torch.zeros(flat.shape[0], num_experts + 1, dtype=torch.int64)
    counts.scatter_add_(1, torch.where(flat < 0, num_experts, flat), torch.ones_like(flat))
    return counts[:, :num_experts]


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
    incoming = _expand(newcomer, copies, width)
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
    held = _holding(old, num_experts).view(num_rows, num_ranks, num_experts).to(torch.float32)
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


def _keep_stayer_slots(new_map: torch.Tensor, old: torch.Tensor, num_ranks: int) -> torch.Tensor:
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
    old_repeats = _repeats(old_by_rank.unsqueeze(1)).squeeze(1).any(dim=1, keepdim=True)
    changed = ((held_before | old_repeats) & (by_rank != old_by_rank)).any(dim=1)
    changed = changed.nonzero().squeeze(1)
    if changed.numel() > 0:
        by_rank[changed] = preserve_intra_rank_slots(by_rank[changed], old_by_rank[changed], 1)
    return by_rank.view(num_layers, num_physical)


def _settled(old: torch.Tensor, load: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[X]`` rows whose old ``[X, K, S]`` placement is complete and already within ``target``.

    Complete: no free slot, every expert placed, and no expert twice on a
    rank where the row has room to avoid it.
    """
    num_rows, num_ranks, slots = old.shape
    n = load.shape[1]
    flat = old.view(num_rows, -1)
    count = _counts_of(flat, n)
    complete = (flat >= 0).all(dim=1) & (count > 0).all(dim=1)
    if slots <= n:
        complete &= ~_repeats(old).flatten(1).any(dim=1)
    per_replica = load / count.clamp(min=1)
    rank_load = per_replica.gather(1, flat.clamp(min=0)).view(num_rows, num_ranks, slots).sum(2)
    return complete & (rank_load.amax(dim=1) <= target * (1 + _EPS))


def _repair(
    rows: _Rows,
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
    rows: _Rows,
    tolerance: float,
    replan_gain: float,
    fresh_gain: float,
    max_rounds: int,
) -> torch.Tensor:
    """:func:`_repair` for the ``[X', n]`` loads of the rows that need one (sizes from ``rows``)."""
    num_rows, n = load.shape
    old_count = _counts_of(_first_copies(old).view(num_rows, -1), n)
    count = _repair_counts(load, old_count, rows.num_slots, rows.cap, hottest * (1 + tolerance))
    placed, peak = _repair_pass(load, old, count, target, rows, max_rounds)

    # Only rows that missed their target are candidates for more, and since
    # no plan beats the bound, another one can only win by replan_gain where
    # the repair stayed that far above it.
    bound = target / (1 + tolerance)
    missed = (peak > torch.maximum(target, bound * (1 + replan_gain))).nonzero().squeeze(1)
    if missed.numel() > 0:
        # More heavy replicas than ranks (Zipf loads) defeat any packing:
        # repair again with at most one per rank.
        spread = _limit_heavy_replicas(
            load[missed], count[missed], target[missed], rows.num_ranks, rows.cap
        )
        changed = (spread != count[missed]).any(dim=1)
        if bool(changed.any()):
            retry = missed[changed]
            sub = _Rows(load[retry], rows.num_ranks, rows.slots, rows_per_layer=1)
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
    stuck = _repeats(placed).flatten(1).any(dim=1) & (rows.slots <= n)
    missed_mask = (peak > torch.maximum(target, bound * (1 + fresh_gain))) | stuck
    if bool(missed_mask.any()):
        index = missed_mask.nonzero().squeeze(1)
        sub = _Rows(load[index], rows.num_ranks, rows.slots, rows_per_layer=1)
        fresh, fresh_peak = _fresh(sub, tolerance * _FRESH_SHARE, max_rounds)
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
    rows: _Rows,
    max_rounds: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Old ``[X, K, S]`` placement re-apportioned to ``count`` and swap-repaired.

    Returns ``([X, K, S] expert ids, [X] max rank load)``.
    """
    num_rows, n = load.shape
    flat = _first_copies(old).view(num_rows, -1)
    per_replica = load / count
    drop = (_counts_of(flat, n) - count).clamp(min=0)
    if bool((drop > 0).any()):
        flat = _drop_replicas(flat, drop, per_replica, rows.slots)
    add = (count - _counts_of(flat, n)).clamp(min=0)
    if bool((add > 0).any()):
        flat = _fill(flat, add, per_replica, rows.slots)
    placed = flat.view(num_rows, rows.num_ranks, rows.slots).contiguous()
    dirty = _repeats(placed).flatten(1).any(dim=1).nonzero().squeeze(1)
    if dirty.numel() > 0:
        subset = placed[dirty]
        _fix_duplicates(subset, per_replica[dirty], max_rounds=2 * rows.num_slots)
        placed[dirty] = subset
    # Cheap paired swaps first; the open search finishes the rows they leave above target.
    placed = _pair_search(placed, per_replica, target, max_rounds, economical=True)
    slot_load = per_replica.gather(1, placed.view(num_rows, -1))
    placed = _search_and_read(placed, slot_load, n, target, max_rounds, _holding(old, n))
    peak = (
        per_replica.gather(1, placed.view(num_rows, -1)).view(placed.shape).sum(dim=2).amax(dim=1)
    )
    return placed, peak


# --------------------------------------------------------------------------- groups


@functools.lru_cache(maxsize=16)
def _layouts(num_groups: int, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every assignment of ``G`` groups to ``N`` nodes, ``G / N`` per node, and its membership.

    Returns ``([count, G] node of each group, [G, count * N] one-hot)`` - the
    second turns ``[L, G]`` group loads into ``[L, count * N]`` node loads by
    one matrix product - or ``None`` when there are more than ``_MAX_LAYOUTS``.
    """
    size = num_groups // num_nodes
    count = math.factorial(num_groups) // math.factorial(size) ** num_nodes
    if count > _MAX_LAYOUTS:
        return None
    found: list[list[int]] = []
    label: list[int] = []
    room = [size] * num_nodes

    def extend() -> None:
        if len(label) == num_groups:
            found.append(list(label))
            return
        for node in range(num_nodes):
            if room[node] > 0:
                room[node] -= 1
                label.append(node)
                extend()
                label.pop()
                room[node] += 1

    extend()
    layouts = torch.tensor(found, dtype=torch.int64)
    member = torch.nn.functional.one_hot(layouts, num_nodes).to(torch.float64)
    return layouts, member.permute(1, 0, 2).reshape(num_groups, -1)


@functools.lru_cache(maxsize=16)
def _partitions(num_groups: int, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Like :func:`_layouts`, one per set partition (nodes in order of first group; 105 for 8/4)."""
    enumerated = _layouts(num_groups, num_nodes)
    if enumerated is None:
        return None
    layouts = enumerated[0]
    first = torch.full((layouts.shape[0], num_nodes), num_groups, dtype=torch.int64)
    first.scatter_reduce_(1, layouts, torch.arange(num_groups).expand_as(layouts), reduce="amin")
    canonical = (first[:, 1:] > first[:, :-1]).all(dim=1)
    layouts = layouts[canonical]
    member = torch.nn.functional.one_hot(layouts, num_nodes).to(torch.float64)
    return layouts, member.permute(1, 0, 2).reshape(num_groups, -1)


@functools.lru_cache(maxsize=16)
def _layout_nodes(num_groups: int, num_nodes: int) -> torch.Tensor:
    """Every layout of :func:`_layouts` as a ``[G * N, count]`` one-hot matrix.

    Entry ``(g * N + k, l)`` is 1 where layout ``l`` puts group ``g`` on node
    ``k``. Only called where :func:`_layouts` enumerated the layouts.
    """
    enumerated = _layouts(num_groups, num_nodes)
    assert enumerated is not None
    layouts = enumerated[0]
    member = torch.nn.functional.one_hot(layouts, num_nodes).to(torch.float64)
    return member.permute(1, 2, 0).reshape(num_groups * num_nodes, -1)


def _heaviest_nodes(group_load: torch.Tensor, member: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``[L, G]`` group loads -> ``[L, count]`` heaviest node load of every layout."""
    return (group_load @ member).view(group_load.shape[0], -1, num_nodes).amax(dim=2)


def _group_layout(
    group_load: torch.Tensor,
    num_nodes: int,
    old: torch.Tensor | None,
    tolerance: float,
    max_rounds: int,
) -> torch.Tensor:
    """Node of each group ``[L, G]`` (``G / N`` per node) that keeps the heaviest node light.

    Without an old layout: the lightest heaviest node. With one (``[L, G]``,
    rows with ``-1`` = unusable): the old layout where its heaviest node is
    within ``1 + tolerance`` of the lightest possible; elsewhere, among the
    layouts that are, the one that leaves the most groups on their old node
    (each moved group moves all its experts' weights).
    """
    num_layers, num_groups = group_load.shape
    per_node = num_groups // num_nodes
    if per_node == 1:
        # Every layout has the same node loads; keep the old one where there is one.
        identity = torch.arange(num_groups).expand(num_layers, -1)
        if old is None:
            return identity.clone()
        return torch.where((old >= 0).all(dim=1, keepdim=True), old, identity)
    enumerated = _layouts(num_groups, num_nodes)
    if enumerated is None:
        rows = _Rows(group_load, num_nodes, per_node, rows_per_layer=1)
        placed, _ = _fresh(rows, 0.0, max_rounds)
        node = torch.arange(num_nodes).repeat_interleave(per_node).expand(num_layers, -1)
        flat = placed.view(num_layers, -1)
        return torch.empty_like(flat).scatter_(1, flat, node)
    layouts, member = enumerated
    partitions = _partitions(num_groups, num_nodes)
    assert partitions is not None
    unlabelled, unlabelled_member = partitions
    best = _heaviest_nodes(group_load, unlabelled_member, num_nodes)
    if old is None:
        return unlabelled[best.argmin(dim=1)]
    lightest = best.amin(dim=1, keepdim=True)
    old_node_load = torch.zeros(num_layers, num_nodes, dtype=group_load.dtype)
    old_node_load.scatter_add_(1, old.clamp(min=0), group_load)
    keep = (old >= 0).all(dim=1) & (
        old_node_load.amax(dim=1) <= lightest.squeeze(1) * (1 + tolerance)
    )
    result = old.clone()
    change = (~keep).nonzero().squeeze(1)
    if change.numel() > 0:
        heaviest = _heaviest_nodes(group_load[change], member, num_nodes)
        good_enough = heaviest <= lightest[change] * (1 + tolerance)
        # Groups each layout leaves on their old node: one-hot old nodes (none
        # for -1) times one-hot layouts, a small matrix product exact on these integers.
        old_node = old[change]
        old_member = torch.nn.functional.one_hot(old_node.clamp(min=0), num_nodes)
        old_member = (old_member * (old_node >= 0).unsqueeze(2)).to(member.dtype)
        staying = old_member.flatten(1) @ _layout_nodes(num_groups, num_nodes)
        # Most groups staying first; among equals, the lightest heaviest node.
        tie_break = heaviest / (heaviest.amax(dim=1, keepdim=True) + 1)
        score = torch.where(good_enough, staying - tie_break, -math.inf)
        result[change] = layouts[score.argmax(dim=1)]
    return result


def _group_layout_of(
    old: torch.Tensor, num_groups: int, num_nodes: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The node each group sits on in ``old`` (by majority of its slots), and whether that fits.

    Returns ``([L, G] node, [L] valid)``; valid means every node holds exactly
    ``G / N`` groups by that rule and every group has a slot.
    """
    num_layers, num_physical = old.shape
    slot_node = (torch.arange(num_physical) // (num_physical // num_nodes)).expand(num_layers, -1)
    group = torch.where(old >= 0, old // group_size, num_groups)
    tally = torch.zeros(num_layers, (num_groups + 1) * num_nodes, dtype=torch.int64)
    tally.scatter_add_(1, group * num_nodes + slot_node, torch.ones_like(old))
    tally = tally.view(num_layers, num_groups + 1, num_nodes)[:, :num_groups]
    node = tally.argmax(dim=2)
    per_node = torch.zeros(num_layers, num_nodes, dtype=torch.int64)
    per_node.scatter_add_(1, node, torch.ones_like(node))
    valid = (per_node == num_groups // num_nodes).all(dim=1) & (tally.amax(dim=2) > 0).all(dim=1)
    return node, valid


# --------------------------------------------------------------------------- policy


@attrs.frozen
class MigrationAwarePolicy:
    """EPLB policy that keeps the current placement and moves only the slots that buy balance.

    See the module docstring for the algorithm. Selectable as
    ``EplbConfig(policy="migration_aware")`` once registered. Stateless and
    deterministic; one instance can be shared.
    """

    tolerance: float = attrs.field(default=0.1, validator=_check_tolerance)
    """Repairs stop at ``(1 + tolerance / S**2)`` x the lower bound (``S`` slots per rank)."""

    replan_gain: float = attrs.field(default=0.015, validator=_check_fraction)
    """Move expert groups to other nodes only to lower the peak by more than this fraction."""

    fresh_gain: float = attrs.field(default=0.05, validator=_check_fraction)
    """Replace a repaired row by a fresh plan only to lower its peak by more than this fraction."""

    max_rounds: int = attrs.field(default=16, validator=_check_rounds)
    """Bound on swap-search rounds per call (each round swaps on many ranks at once)."""

    @property
    def name(self) -> str:
        """Registry name of this policy."""
        return _NAME

    def rebalance_experts(
        self,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_physical_to_logical_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute a new ``physical_to_logical_map [layers, num_replicas]`` (int64, CPU).

        See :class:`moe_protocols.eplb._policy.RebalancePolicy` for the
        contract. The old placement is used when it has the same
        ``[layers, num_replicas]`` shape; otherwise the plan is from scratch.
        """
        # Imported here: _policy imports the built-in policies at module level.
        from moe_protocols.eplb._policy import check_policy_inputs, check_policy_output

        load = check_policy_inputs(
            weight, num_replicas, num_groups, num_nodes, num_ranks, old_physical_to_logical_map
        )
        # No autograd bookkeeping: the policy is pure index arithmetic.
        with torch.inference_mode():
            new_map = self._plan(
                load, num_replicas, num_groups, num_nodes, num_ranks, old_physical_to_logical_map
            )
        return check_policy_output(self.name, new_map.clone(), load, num_replicas, num_ranks)

    def _plan(
        self,
        load: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_physical_to_logical_map: torch.Tensor | None,
    ) -> torch.Tensor:
        """The new ``[layers, num_replicas]`` map for checked inputs."""
        num_layers, num_logical = load.shape
        old: torch.Tensor | None = None
        if old_physical_to_logical_map is not None and tuple(old_physical_to_logical_map.shape) == (
            num_layers,
            num_replicas,
        ):
            old = old_physical_to_logical_map.detach().to(device="cpu", dtype=torch.int64)
        hierarchical = (
            num_nodes > 1 and num_groups % num_nodes == 0 and num_logical % num_groups == 0
        )
        nodes = num_nodes if hierarchical else 1
        slots = num_replicas // num_ranks
        if hierarchical:
            node_experts = self._node_experts(load, num_groups, num_nodes, slots, old)
        else:
            node_experts = torch.arange(num_logical).expand(num_layers, 1, -1)
        ranks_per_node = num_ranks // nodes
        flat_experts = node_experts.reshape(num_layers * nodes, num_logical // nodes)
        rows = _Rows(
            load.gather(1, node_experts.reshape(num_layers, -1)).view(flat_experts.shape),
            ranks_per_node,
            slots,
            rows_per_layer=nodes,
        )
        if old is None:
            placed, _ = _fresh(rows, self.tolerance * _FRESH_SHARE / slots**2, self.max_rounds)
        else:
            local_old = self._project(old, node_experts, num_logical, ranks_per_node, slots)
            placed = _repair(
                rows,
                local_old,
                self.tolerance / slots**2,
                self.replan_gain,
                self.fresh_gain,
                self.max_rounds,
            )
        new_map = flat_experts.gather(1, placed.view(num_layers * nodes, -1))
        new_map = new_map.view(num_layers, num_replicas)
        if old is not None:
            # A replica swapped away and back, or a row replaced by a fresh
            # plan, may sit in another slot of its old rank: put stayers back.
            new_map = _keep_stayer_slots(new_map, old, num_ranks)
        return new_map

    def _node_experts(
        self,
        load: torch.Tensor,
        num_groups: int,
        num_nodes: int,
        slots: int,
        old: torch.Tensor | None,
    ) -> torch.Tensor:
        """``[L, N, E / N]`` logical experts on each node (whole groups, ascending ids)."""
        num_layers, num_logical = load.shape
        group_size = num_logical // num_groups
        group_load = load.view(num_layers, num_groups, group_size).sum(dim=2)
        old_layout: torch.Tensor | None = None
        if old is not None:
            old_layout, valid = _group_layout_of(old, num_groups, num_nodes, group_size)
            old_layout = torch.where(valid.unsqueeze(1), old_layout, -1)
        layout = _group_layout(group_load, num_nodes, old_layout, self.replan_gain, self.max_rounds)
        # Groups in node order (stable: ascending group id within a node).
        groups = torch.sort(layout, dim=1, stable=True).indices
        experts = groups.unsqueeze(2) * group_size + torch.arange(group_size)
        return experts.view(num_layers, num_nodes, num_logical // num_nodes)

    @staticmethod
    def _project(
        old: torch.Tensor,
        node_experts: torch.Tensor,
        num_logical: int,
        ranks_per_node: int,
        slots: int,
    ) -> torch.Tensor:
        """Old ``[L, P]`` map -> ``[L * N, K, S]`` row-local ids; ``-1``: the slot must change."""
        num_layers, nodes, per_node = node_experts.shape
        ids = node_experts.reshape(num_layers, -1)
        local = torch.full((num_layers, num_logical + 1), -1, dtype=torch.int64)
        local.scatter_(1, ids, torch.arange(per_node).repeat(nodes).expand(num_layers, -1))
        node_of = torch.full((num_layers, num_logical + 1), -1, dtype=torch.int64)
        node_of.scatter_(
            1, ids, torch.arange(nodes).repeat_interleave(per_node).expand(num_layers, -1)
        )
        safe = torch.where(old >= 0, old, num_logical)
        slot_node = torch.arange(old.shape[1]) // (old.shape[1] // nodes)
        at_home = node_of.gather(1, safe) == slot_node
        projected = torch.where(at_home, local.gather(1, safe), -1)
        return projected.view(num_layers * nodes, ranks_per_node, slots).contiguous()
