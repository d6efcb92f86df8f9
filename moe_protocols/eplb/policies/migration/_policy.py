"""The migration-aware policy: keep the current placement and repair it with few targeted swaps.

The algorithm is described in ``docs/policies/migration_aware.md``.
"""

from __future__ import annotations

from typing import Final

import attrs
import torch

from moe_protocols._validate import FINITE_AT_LEAST_ZERO, IN_UNIT_INTERVAL, int_field, number_field
from moe_protocols.eplb.policies._contract import CheckedPolicy
from moe_protocols.eplb.policies.migration._groups import group_layout, group_layout_of
from moe_protocols.eplb.policies.migration._pack import FRESH_SHARE, fresh_plan
from moe_protocols.eplb.policies.migration._repair import keep_stayer_slots, repair
from moe_protocols.eplb.policies.migration._rows import Rows
from moe_protocols.errors import PolicyError

__all__ = ["MigrationAwarePolicy"]

_NAME: Final = "migration_aware"


_OWNER: Final = "MigrationAwarePolicy"
_check_tolerance = number_field(
    PolicyError, owner=_OWNER, finite=True, template=FINITE_AT_LEAST_ZERO
)
_check_fraction = number_field(PolicyError, owner=_OWNER, maximum=1.0, template=IN_UNIT_INTERVAL)
_check_rounds = int_field(0, PolicyError, owner=_OWNER)


@attrs.frozen
class MigrationAwarePolicy(CheckedPolicy):
    """EPLB policy that keeps the current placement and moves only the slots that buy balance.

    It starts from the current placement, keeps every rank that is already
    balanced enough and repairs the others with few swaps, falling back to a
    from-scratch plan only where that buys clearly more balance. The
    algorithm, its knobs and their trade-offs are described in
    ``docs/policies/migration_aware.md``. Registered as ``"migration_aware"``
    in :data:`~moe_protocols.eplb.DEFAULT_POLICIES`. Stateless and
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
        :class:`~moe_protocols.eplb.policies.RebalancePolicy` for the
        contract. The old placement is used when it has the same
        ``[layers, num_replicas]`` shape; otherwise the plan is from scratch.
        """
        # No autograd bookkeeping: the policy is pure index arithmetic.
        with torch.inference_mode():
            new_map = self._plan(
                load, num_replicas, num_groups, num_nodes, num_ranks, old_physical_to_logical_map
            )
        # Inference tensors cannot be changed outside inference mode: hand back an ordinary one.
        return new_map.clone()

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
        rows = Rows(
            load.gather(1, node_experts.reshape(num_layers, -1)).view(flat_experts.shape),
            ranks_per_node,
            slots,
            rows_per_layer=nodes,
        )
        if old is None:
            placed, _ = fresh_plan(rows, self.tolerance * FRESH_SHARE / slots**2, self.max_rounds)
        else:
            local_old = self._project(old, node_experts, num_logical, ranks_per_node, slots)
            placed = repair(
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
            new_map = keep_stayer_slots(new_map, old, num_ranks)
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
            old_layout, valid = group_layout_of(old, num_groups, num_nodes, group_size)
            old_layout = torch.where(valid.unsqueeze(1), old_layout, -1)
        layout = group_layout(group_load, num_nodes, old_layout, self.replan_gain, self.max_rounds)
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
