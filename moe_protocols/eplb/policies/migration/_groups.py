"""Choosing the node of every expert group (hierarchical placements)."""

from __future__ import annotations

import math

import torch

from moe_protocols.eplb.policies._layouts import (
    group_layouts,
    group_partitions,
    heaviest_nodes,
    layout_membership,
)
from moe_protocols.eplb.policies.migration._pack import fresh_plan
from moe_protocols.eplb.policies.migration._rows import Rows

__all__ = ["group_layout", "group_layout_of"]


def group_layout(
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
    enumerated = group_layouts(num_groups, num_nodes)
    if enumerated is None:
        rows = Rows(group_load, num_nodes, per_node, rows_per_layer=1)
        placed, _ = fresh_plan(rows, 0.0, max_rounds)
        node = torch.arange(num_nodes).repeat_interleave(per_node).expand(num_layers, -1)
        flat = placed.view(num_layers, -1)
        return torch.empty_like(flat).scatter_(1, flat, node)
    layouts, member = enumerated
    partitions = group_partitions(num_groups, num_nodes)
    assert partitions is not None
    unlabelled, unlabelled_member = partitions
    best = heaviest_nodes(group_load, unlabelled_member, num_nodes)
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
        heaviest = heaviest_nodes(group_load[change], member, num_nodes)
        good_enough = heaviest <= lightest[change] * (1 + tolerance)
        # Groups each layout leaves on their old node: one-hot old nodes (none
        # for -1) times one-hot layouts, a small matrix product exact on these integers.
        old_node = old[change]
        old_member = torch.nn.functional.one_hot(old_node.clamp(min=0), num_nodes)
        old_member = (old_member * (old_node >= 0).unsqueeze(2)).to(member.dtype)
        staying = old_member.flatten(1) @ layout_membership(num_groups, num_nodes)
        # Most groups staying first; among equals, the lightest heaviest node.
        tie_break = heaviest / (heaviest.amax(dim=1, keepdim=True) + 1)
        score = torch.where(good_enough, staying - tie_break, -math.inf)
        result[change] = layouts[score.argmax(dim=1)]
    return result


def group_layout_of(
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
