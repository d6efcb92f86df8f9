"""Placement metrics beyond ``_metrics``: the lower bound, migration cost, and realised balance.

Lower bound on the max rank load (:func:`max_rank_load_lower_bound`), per
layer, for loads ``w_e`` (total ``W``), ``R`` ranks and ``P`` slots, where an
expert with ``c_e`` replicas puts ``w_e / c_e`` on each (even split):

* ``W / R``: some rank carries at least the average.
* ``p*``: the smallest achievable ``max_e w_e / c_e`` over counts with
  ``c_e >= 1``, ``sum c_e = P`` and ``c_e <= R`` (D'Hondt apportionment,
  exact). Every placement holds a replica of the argmax expert somewhere, and
  a rank that holds ``m`` replicas of ``e`` carries ``m w_e / c_e``, so a
  placement with duplicates on a rank is bounded by ``w_e / min(c_e, R)``: the
  cap keeps the bound valid for every placement.
* Hierarchical placements (whole groups on one node, ``G / N`` groups per
  node, every replica on its group's node): the heaviest node's load divided
  by its ``R / N`` ranks, minimised over all group layouts - exactly, by
  enumeration, when there are at most 5000 layouts (8 groups on 4 nodes:
  2520); otherwise by ``max(W / N, heaviest group, g_N + g_(N+1))`` with
  ``g`` the group loads sorted descending (two of the ``N + 1`` heaviest
  groups share a node).

The bound is ``max`` of the applicable terms; ``balancedness_bound`` is
``(W / R) / bound``, the best balancedness any placement can reach.

Realised balance: a placement is planned on one window's loads; users see it
on the next window's (:func:`realised_balancedness` with drifted loads) and
step by step under sampling noise (:func:`sampled_balancedness`).
"""

from __future__ import annotations

import attrs
import torch

from moe_protocols.eplb import _limits
from moe_protocols.eplb._metrics import balancedness, expected_rank_loads
from moe_protocols.eplb.analysis.workloads import sample_step_loads
from moe_protocols.eplb.policies._apportion import replica_counts
from moe_protocols.eplb.policies._layouts import group_layouts, heaviest_nodes
from moe_protocols.errors import MappingError

__all__ = [
    "MigrationStats",
    "balancedness_bound",
    "duplicate_replicas",
    "max_rank_load_lower_bound",
    "migration_stats",
    "realised_balancedness",
    "sampled_balancedness",
]


def _check_sizes(
    placement: torch.Tensor, *, num_physical: int | None = None, num_ranks: int, num_nodes: int = 1
) -> None:
    """Refuse shapes and counts over the limits (``_limits``) before allocating for them."""
    if placement.dim() == 2:
        _limits.check_count("layers", int(placement.shape[0]), "MAX_LAYERS", MappingError)
    for name, value, limit in (
        ("num_physical", num_physical, "MAX_PHYSICAL_SLOTS"),
        ("num_ranks", num_ranks, "MAX_RANKS"),
        ("num_nodes", num_nodes, "MAX_NODES"),
    ):
        if value is not None:
            _limits.check_count(name, value, limit, MappingError)


def _as_load(logical_load: torch.Tensor) -> torch.Tensor:
    if logical_load.dim() != 2 or logical_load.shape[0] < 1 or logical_load.shape[1] < 1:
        raise MappingError(
            "logical_load must be a non-empty [layers, logical] tensor, "
            f"got {tuple(logical_load.shape)}"
        )
    return logical_load.detach().to(device="cpu", dtype=torch.float64)


def max_rank_load_lower_bound(
    logical_load: torch.Tensor,
    num_physical: int,
    num_ranks: int,
    *,
    num_groups: int = 1,
    num_nodes: int = 1,
    groups_on_nodes: bool = False,
) -> torch.Tensor:
    """``[layers]`` lower bound on the max rank load of any placement into ``num_physical`` slots.

    Args:
        logical_load: ``[layers, logical]`` non-negative load per logical expert.
        num_physical: slots ``P >= E``, a multiple of ``num_ranks``.
        num_ranks: EP ranks ``R``.
        num_groups: expert groups ``G`` (used with ``groups_on_nodes``).
        num_nodes: nodes ``N`` (used with ``groups_on_nodes``).
        groups_on_nodes: bound placements that keep whole groups on one node
            (the hierarchical policies); requires ``G % N == 0`` and ``E % G == 0``.

    Raises:
        MappingError: shapes or counts that admit no placement.
    """
    _check_sizes(logical_load, num_physical=num_physical, num_ranks=num_ranks)
    load = _as_load(logical_load)
    num_layers, num_logical = load.shape
    if num_ranks < 1 or num_physical < num_logical or num_physical % num_ranks != 0:
        raise MappingError(
            f"no placement of {num_logical} experts into {num_physical} slots "
            f"over {num_ranks} ranks"
        )
    cap = max(num_ranks, -(-num_physical // num_logical))
    _, hottest = replica_counts(load, num_physical, cap)
    bound = torch.maximum(load.sum(dim=1) / num_ranks, hottest)
    if not groups_on_nodes:
        return bound
    if num_groups % num_nodes != 0 or num_logical % num_groups != 0 or num_ranks % num_nodes != 0:
        raise MappingError(
            f"groups_on_nodes needs num_groups % num_nodes == 0 and num_logical % num_groups == 0, "
            f"got E={num_logical}, G={num_groups}, N={num_nodes}, R={num_ranks}"
        )
    group_load = load.view(num_layers, num_groups, -1).sum(dim=2)
    enumerated = group_layouts(num_groups, num_nodes)
    if enumerated is not None:
        node = heaviest_nodes(group_load, enumerated[1], num_nodes).amin(dim=1)
    else:
        ordered = torch.sort(group_load, dim=1, descending=True).values
        node = torch.maximum(group_load.sum(dim=1) / num_nodes, ordered[:, 0])
        if num_groups > num_nodes:
            node = torch.maximum(node, ordered[:, num_nodes - 1] + ordered[:, num_nodes])
    return torch.maximum(bound, node / (num_ranks // num_nodes))


def balancedness_bound(
    logical_load: torch.Tensor,
    num_physical: int,
    num_ranks: int,
    *,
    num_groups: int = 1,
    num_nodes: int = 1,
    groups_on_nodes: bool = False,
) -> torch.Tensor:
    """``[layers]`` best reachable balancedness: mean rank load over the lower bound."""
    load = _as_load(logical_load)
    bound = max_rank_load_lower_bound(
        load,
        num_physical,
        num_ranks,
        num_groups=num_groups,
        num_nodes=num_nodes,
        groups_on_nodes=groups_on_nodes,
    )
    mean = load.sum(dim=1) / num_ranks
    return torch.where(bound > 0, mean / torch.where(bound > 0, bound, 1.0), 1.0)


@attrs.frozen
class MigrationStats:
    """What moving from one placement to another costs in weight traffic."""

    slots_refetched: int
    """Slots whose expert was not on that rank before (each one expert's weights received)."""
    fraction: float
    """``slots_refetched`` over all slots of all layers."""
    bytes_moved: int
    """``slots_refetched * expert_bytes``."""
    inter_node_slots: int
    """Refetched slots whose expert had no replica on the same node before (cross-node traffic)."""
    max_slots_into_one_rank: int
    """Most slots one rank receives, summed over layers (what a rank waits for)."""


def migration_stats(
    old_map: torch.Tensor,
    new_map: torch.Tensor,
    num_ranks: int,
    *,
    num_nodes: int = 1,
    expert_bytes: int = 1,
) -> MigrationStats:
    """Traffic of a rebalance from ``old_map`` to ``new_map`` (both ``[layers, physical]``).

    A slot is refetched when its rank held fewer copies of its expert before
    (reshuffles within a rank are local copies). It counts as inter-node when
    no rank of its node held the expert before.

    Raises:
        MappingError: the maps differ in shape, hold ids below ``-1`` or of
            ``MAX_LOGICAL_EXPERTS`` and above, or do not split over
            ``num_ranks`` ranks and ``num_nodes`` nodes.
    """
    if old_map.shape != new_map.shape or new_map.dim() != 2:
        raise MappingError(
            f"cannot compare placements of shapes {tuple(old_map.shape)} and {tuple(new_map.shape)}"
        )
    num_layers, num_physical = new_map.shape
    _check_sizes(new_map, num_physical=num_physical, num_ranks=num_ranks, num_nodes=num_nodes)
    if num_ranks < 1 or num_physical % num_ranks or num_nodes < 1 or num_ranks % num_nodes:
        raise MappingError(
            f"{num_physical} slots do not split over {num_ranks} ranks on {num_nodes} nodes"
        )
    old = old_map.detach().to(device="cpu", dtype=torch.int64)
    new = new_map.detach().to(device="cpu", dtype=torch.int64)
    if bool((old < -1).any() or (new < -1).any()):
        raise MappingError("placements may hold only expert ids >= 0 and -1 for an empty slot")
    largest = int(torch.maximum(old.max(), new.max())) if old.numel() else -1
    # The histograms below are [.., largest + 2] wide: an id of 2**40 must not size them.
    _limits.check_count(
        "the largest expert id + 1", largest + 1, "MAX_LOGICAL_EXPERTS", MappingError
    )
    width = largest + 2

    def histogram(placement: torch.Tensor, parts: int) -> torch.Tensor:
        rows = placement.reshape(num_layers * parts, -1) + 1
        counts = torch.zeros(rows.shape[0], width, dtype=torch.int64)
        counts.scatter_add_(1, rows, torch.ones_like(rows))
        counts[:, 0] = 0  # empty slots are never fetched
        return counts.view(num_layers, parts, width)

    fetched = (histogram(new, num_ranks) - histogram(old, num_ranks)).clamp(min=0)
    old_node = histogram(old, num_nodes) > 0
    ranks_per_node = num_ranks // num_nodes
    node_of_rank = torch.arange(num_ranks) // ranks_per_node
    foreign = ~old_node[:, node_of_rank]
    refetched = int(fetched.sum())
    return MigrationStats(
        slots_refetched=refetched,
        fraction=refetched / max(1, num_layers * num_physical),
        bytes_moved=refetched * expert_bytes,
        inter_node_slots=int((fetched * foreign).sum()),
        max_slots_into_one_rank=int(fetched.sum(dim=(0, 2)).max()),
    )


def duplicate_replicas(physical_to_logical_map: torch.Tensor, num_ranks: int) -> int:
    """How many slots hold an expert that an earlier slot of the same rank already holds."""
    p2l = physical_to_logical_map.detach().to(device="cpu", dtype=torch.int64)
    if p2l.dim() != 2 or p2l.shape[1] % num_ranks != 0:
        raise MappingError(
            f"physical_to_logical_map {tuple(p2l.shape)} does not split over {num_ranks} ranks"
        )
    per_rank = torch.sort(p2l.reshape(-1, p2l.shape[1] // num_ranks), dim=1).values
    return int(((per_rank[:, 1:] == per_rank[:, :-1]) & (per_rank[:, 1:] >= 0)).sum())


def realised_balancedness(
    physical_to_logical_map: torch.Tensor, logical_load: torch.Tensor, num_ranks: int
) -> float:
    """Mean over layers of the balancedness the placement reaches on ``logical_load``.

    Pass the loads of a later window than the plan's to see what drift costs.
    """
    rank_load = expected_rank_loads(physical_to_logical_map, logical_load, num_ranks)
    return float(balancedness(rank_load).mean())


def sampled_balancedness(
    physical_to_logical_map: torch.Tensor,
    logical_load: torch.Tensor,
    num_ranks: int,
    *,
    tokens_per_step: int,
    top_k: int,
    num_steps: int,
    seed: int,
) -> float:
    """Mean per-step balancedness when each step draws its tokens from ``logical_load``'s shares.

    Each step routes ``tokens_per_step * top_k`` token-expert pairs per layer
    (:func:`moe_protocols.eplb.analysis.workloads.sample_step_loads`); each expert's
    tokens are split evenly over its replicas.
    """
    steps = sample_step_loads(
        _as_load(logical_load),
        tokens_per_step=tokens_per_step,
        top_k=top_k,
        num_steps=num_steps,
        seed=seed,
    )
    num_layers = steps.shape[1]
    flat = steps.reshape(num_steps * num_layers, -1)
    placement = physical_to_logical_map.repeat(num_steps, 1)
    rank_load = expected_rank_loads(placement, flat, num_ranks)
    return float(balancedness(rank_load).mean())
