"""The DeepSeek EPLB rebalancing algorithm, vectorised over layers.

Our own implementation of the algorithm published with DeepSeek-V3
(``deepseek-ai/EPLB``): replicate hot experts by the D'Hondt rule, then pack
replicas onto ranks heaviest first into the lightest rank with a free slot.
The hierarchical variant first packs whole expert groups onto nodes so that
group-limited routing stays inside a node.

Every function works on a batch of independent rows (``X`` = layers, or
layers x nodes) at once. The only Python loops run over items in order (one
added replica, or one packed item, per iteration) and each iteration is a
tensor operation over all rows. Ties are broken by the lower index, so the
result is deterministic.
"""

from __future__ import annotations

from typing import Final

import torch

from moe_protocols.eplb.policies._contract import CheckedPolicy
from moe_protocols.eplb.policies._slots import occurrence, preserve_intra_rank_slots
from moe_protocols.errors import PolicyError

__all__ = [
    "DeepSeekPolicy",
    "balanced_packing",
    "rebalance_global",
    "rebalance_hierarchical",
    "replicate_experts",
]


def replicate_experts(
    weight: torch.Tensor, num_phy: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spread ``num_phy`` physical replicas over ``n`` experts to minimise the hottest replica.

    Every expert starts with one replica; each further replica goes to the
    expert with the largest load per replica (``weight / count``), lowest
    index on ties. This D'Hondt apportionment minimises
    ``max_e weight[e] / count[e]``.

    Args:
        weight: ``[X, n]`` non-negative load per expert, one row per independent problem.
        num_phy: physical replicas per row, ``>= n``.

    Returns:
        ``(phy2log, replica_rank, logcnt)``: ``[X, num_phy]`` expert of each
        replica (replica ``i < n`` is the first replica of expert ``i``, then
        the added ones in the order they were chosen), ``[X, num_phy]`` index
        of that replica among its expert's replicas, ``[X, n]`` replica count.
        All int64.
    """
    num_rows, num_log = weight.shape
    if num_phy < num_log:
        raise PolicyError(f"num_phy={num_phy} must be >= the number of experts {num_log}")
    device = weight.device
    logcnt = torch.ones(num_rows, num_log, dtype=torch.int64, device=device)
    one = torch.ones(num_rows, 1, dtype=torch.int64, device=device)
    chosen = [torch.arange(num_log, device=device).expand(num_rows, -1)]
    for _ in range(num_phy - num_log):
        # argmax returns the first maximum: the lowest expert index wins ties.
        expert = torch.argmax(weight / logcnt, dim=1, keepdim=True)
        chosen.append(expert)
        logcnt.scatter_add_(1, expert, one)
    phy2log = torch.cat(chosen, dim=1)
    # Replica i of an expert is its (i+1)-th appearance in phy2log.
    replica_rank = occurrence(phy2log)
    return phy2log, replica_rank, logcnt


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``n`` weighted items into ``num_packs`` packs of exactly ``n / num_packs`` items each.

    Items are taken heaviest first (lower index first on equal weight) and
    each goes to the currently lightest pack that still has room (lower pack
    index on ties): longest-processing-time scheduling with a cardinality cap.
    With one item per pack the packing is the identity.

    Args:
        weight: ``[X, n]`` finite item weights, one row per independent problem.
        num_packs: number of packs; must divide ``n``.

    Returns:
        ``(pack_index, rank_in_pack)``: both ``[X, n]`` int64; item ``i`` goes to
        pack ``pack_index[:, i]`` at position ``rank_in_pack[:, i]``
        (``0 .. n / num_packs - 1``, in the order the items were placed).
    """
    num_rows, num_items = weight.shape
    if num_packs < 1 or num_items % num_packs != 0:
        raise PolicyError(
            f"num_packs={num_packs} must be >= 1 and divide the item count {num_items}"
        )
    device = weight.device
    per_pack = num_items // num_packs
    if per_pack == 1:
        identity = torch.arange(num_items, dtype=torch.int64, device=device).repeat(num_rows, 1)
        return identity, torch.zeros_like(identity)
    order = torch.sort(weight, dim=1, descending=True, stable=True).indices
    sorted_weight = weight.gather(1, order).to(torch.float64)
    # A full pack's load is set to +inf so argmin never picks it again.
    loads = torch.zeros(num_rows, num_packs, dtype=torch.float64, device=device)
    counts = torch.zeros(num_rows, num_packs, dtype=torch.int64, device=device)
    one = torch.ones(num_rows, 1, dtype=torch.int64, device=device)
    chosen: list[torch.Tensor] = []
    for item in range(num_items):
        # argmin returns the first minimum: the lowest pack index wins ties.
        pack = torch.argmin(loads, dim=1, keepdim=True)
        chosen.append(pack)
        loads.scatter_add_(1, pack, sorted_weight[:, item : item + 1])
        counts.scatter_add_(1, pack, one)
        loads.masked_fill_(counts == per_pack, torch.inf)
    pack_of_sorted = torch.cat(chosen, dim=1)
    # An item's position in its pack = how many heavier items went there first.
    rank_of_sorted = occurrence(pack_of_sorted)
    pack_index = torch.empty_like(pack_of_sorted).scatter_(1, order, pack_of_sorted)
    rank_in_pack = torch.empty_like(rank_of_sorted).scatter_(1, order, rank_of_sorted)
    return pack_index, rank_in_pack


def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of a ``[X, n]`` batch of permutations."""
    positions = torch.arange(perm.shape[1], dtype=perm.dtype, device=perm.device)
    return torch.empty_like(perm).scatter_(1, perm, positions.expand_as(perm))


def rebalance_hierarchical(
    weight: torch.Tensor,
    num_physical: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
) -> torch.Tensor:
    """Place replicas so that whole expert groups stay on one node, then balance ranks in a node.

    1. Pack expert groups onto nodes by group load (``G / N`` groups per node).
    2. Within each node, replicate its experts into the node's ``P / N`` slots.
    3. Pack each node's replicas (load = expert load / replica count) onto the
       node's ``R / N`` ranks, ``P / R`` slots per rank.

    Args:
        weight: ``[layers, logical]`` non-negative finite load per logical expert.
        num_physical: physical slots ``P``; a multiple of ``num_ranks``.
        num_groups: expert groups ``G``; divides ``E`` and is a multiple of ``num_nodes``.
        num_nodes: nodes ``N``; divides ``num_ranks``.
        num_ranks: EP ranks ``R``.

    Returns:
        ``physical_to_logical_map [layers, physical]`` int64, slots rank-major.
    """
    num_layers, num_logical = weight.shape
    if (
        num_logical % num_groups != 0
        or num_groups % num_nodes != 0
        or num_ranks % num_nodes != 0
        or num_physical % num_ranks != 0
        or num_physical < num_logical
    ):
        raise PolicyError(
            f"inconsistent shape: E={num_logical}, P={num_physical}, G={num_groups}, "
            f"N={num_nodes}, R={num_ranks}"
        )
    weight = weight.to(torch.float64)
    device = weight.device
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_logical // num_nodes
    slots_per_node = num_physical // num_nodes
    ranks_per_node = num_ranks // num_nodes
    slots_per_rank = num_physical // num_ranks

    # Step 1: groups onto nodes. The node-major order of logical experts ("mlog")
    # puts the experts of node k's groups at positions k * E/N .. (k+1) * E/N - 1.
    group_load = weight.view(num_layers, num_groups, group_size).sum(dim=2)
    group_node, group_rank = balanced_packing(group_load, num_nodes)
    group_start = (group_node * groups_per_node + group_rank) * group_size
    log2mlog = (group_start.unsqueeze(2) + torch.arange(group_size, device=device)).flatten(1)
    mlog2log = _inverse_permutation(log2mlog)

    # Step 2: replicate inside each node; rows are (layer, node) pairs.
    mlog_load = weight.gather(1, mlog2log).view(num_layers * num_nodes, experts_per_node)
    phy2mlog, _, mlog_count = replicate_experts(mlog_load, slots_per_node)

    # Step 3: the node's replicas onto the node's ranks.
    replica_load = (mlog_load / mlog_count).gather(1, phy2mlog)
    rank_index, rank_slot = balanced_packing(replica_load, ranks_per_node)
    phy2slot = rank_index * slots_per_rank + rank_slot
    slot2mlog = phy2mlog.gather(1, _inverse_permutation(phy2slot))
    node_offset = torch.arange(num_nodes, device=device).unsqueeze(1) * experts_per_node
    slot2mlog = (slot2mlog.view(num_layers, num_nodes, slots_per_node) + node_offset).flatten(1)
    return mlog2log.gather(1, slot2mlog)


def rebalance_global(
    weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int
) -> torch.Tensor:
    """Place replicas ignoring groups and nodes: replicate over all slots, pack onto all ranks.

    ``num_groups`` and ``num_nodes`` are accepted for a uniform signature and
    ignored. Returns ``physical_to_logical_map [layers, physical]`` int64.
    """
    return rebalance_hierarchical(weight, num_physical, 1, 1, num_ranks)


class DeepSeekPolicy(CheckedPolicy):
    """The published DeepSeek EPLB policy: hierarchical when groups fit nodes, else global.

    Hierarchical iff ``num_groups % num_nodes == 0`` and the groups split the
    experts evenly; otherwise the global variant (one group, one node). When
    an old placement of the same shape is given, each rank's slots are
    reordered so that experts staying on a rank keep their slot
    (:func:`preserve_intra_rank_slots`). Stateless; one instance can be shared.
    """

    _NAME: Final = "deepseek"

    @property
    def name(self) -> str:
        """Registry name of this policy."""
        return self._NAME

    def __repr__(self) -> str:
        return "DeepSeekPolicy()"

    def plan_checked(
        self,
        load: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_physical_to_logical_map: torch.Tensor | None,
    ) -> torch.Tensor:
        """The new ``physical_to_logical_map [layers, num_replicas]`` for checked arguments.

        Called through :func:`~moe_protocols.eplb.policies.checked_rebalance`
        (``rebalance_experts`` does that); see
        :class:`~moe_protocols.eplb.policies.RebalancePolicy` for the contract.
        """
        num_logical = load.shape[1]
        if num_groups % num_nodes == 0 and num_logical % num_groups == 0:
            new_map = rebalance_hierarchical(load, num_replicas, num_groups, num_nodes, num_ranks)
        else:
            new_map = rebalance_global(load, num_replicas, num_groups, num_nodes, num_ranks)
        if old_physical_to_logical_map is not None:
            new_map = preserve_intra_rank_slots(
                new_map, old_physical_to_logical_map.cpu(), num_ranks
            )
        return new_map
