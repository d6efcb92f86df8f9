"""Layouts of expert groups on nodes, enumerated; shared by the migration policy and bounds."""

from __future__ import annotations

import functools
import math
from typing import Final

import torch

__all__ = ["group_layouts", "group_partitions", "heaviest_nodes", "layout_membership"]

# Largest number of group-to-node layouts searched exhaustively.

# Largest number of group-to-node layouts searched exhaustively.
_MAX_LAYOUTS: Final = 5000


@functools.lru_cache(maxsize=16)
def group_layouts(num_groups: int, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
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
def group_partitions(num_groups: int, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Like :func:`group_layouts`, one per set partition (nodes by first group; 105 for 8/4)."""
    enumerated = group_layouts(num_groups, num_nodes)
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
def layout_membership(num_groups: int, num_nodes: int) -> torch.Tensor:
    """Every layout of :func:`group_layouts` as a ``[G * N, count]`` one-hot matrix.

    Entry ``(g * N + k, l)`` is 1 where layout ``l`` puts group ``g`` on node
    ``k``. Only called where :func:`group_layouts` enumerated the layouts.
    """
    enumerated = group_layouts(num_groups, num_nodes)
    assert enumerated is not None
    layouts = enumerated[0]
    member = torch.nn.functional.one_hot(layouts, num_nodes).to(torch.float64)
    return member.permute(1, 2, 0).reshape(num_groups * num_nodes, -1)


def heaviest_nodes(group_load: torch.Tensor, member: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``[L, G]`` group loads -> ``[L, count]`` heaviest node load of every layout."""
    return (group_load @ member).view(group_load.shape[0], -1, num_nodes).amax(dim=2)
