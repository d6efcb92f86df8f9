"""Keeping replicas that stay on a rank in their old slot (both built-in policies)."""

from __future__ import annotations

import torch

from moe_protocols.errors import PolicyError

__all__ = ["occurrence", "preserve_intra_rank_slots"]


def preserve_intra_rank_slots(
    new_map: torch.Tensor, old_map: torch.Tensor, num_ranks: int
) -> torch.Tensor:
    """Reorder each rank's slots so experts that stay on a rank keep their old slot.

    Within every (layer, rank), the k-th copy (in slot order) of an expert in
    ``new_map`` takes the slot of the k-th copy of that expert in ``old_map``
    if there is one; the remaining experts fill the freed slots, both in
    ascending slot order. Each rank ends up with the same multiset of experts
    as in ``new_map``; only the order inside a rank changes, which saves the
    copies a pure reshuffle would cost.

    Args:
        new_map: ``[layers, physical]`` freshly computed placement.
        old_map: ``[layers, physical]`` placement currently in use (``-1`` = empty slot).
        num_ranks: EP ranks; must divide ``physical``.

    Returns:
        A new ``[layers, physical]`` int64 tensor; ``new_map`` itself (as
        int64) when the shapes differ, since then no slot can be kept.
    """
    new_map = new_map.to(torch.int64)
    if old_map.shape != new_map.shape:
        return new_map
    num_layers, num_physical = new_map.shape
    if num_ranks < 1 or num_physical % num_ranks != 0:
        raise PolicyError(f"num_ranks={num_ranks} must be >= 1 and divide {num_physical} slots")
    slots = num_physical // num_ranks
    new = new_map.reshape(num_layers * num_ranks, slots)
    old = old_map.to(device=new_map.device, dtype=torch.int64).reshape(
        num_layers * num_ranks, slots
    )
    # Key each slot by (expert, occurrence of that expert within the rank).
    # Keys are unique within one side, so after a stable sort of old and new
    # keys together an equal adjacent pair is an old copy followed by the new
    # copy that can stay in its slot.
    both = torch.cat([old * slots + occurrence(old), new * slots + occurrence(new)], dim=1)
    sorted_keys, origin = torch.sort(both, dim=1, stable=True)
    pair = sorted_keys[:, 1:] == sorted_keys[:, :-1]
    # Unpaired entries are routed to a spare column ``slots`` and dropped.
    new_slot = torch.where(pair, origin[:, 1:] - slots, slots)
    old_slot = torch.where(pair, origin[:, :-1], slots)
    spare = torch.zeros(new.shape[0], slots + 1, dtype=torch.int64, device=new.device)
    stays = spare.to(torch.bool).scatter_(1, new_slot, pair)[:, :slots]
    kept_slot = spare.clone().scatter_(1, new_slot, old_slot)[:, :slots]
    taken = spare.to(torch.bool).scatter_(1, old_slot, pair)[:, :slots]
    # Movers (unmatched new entries, in slot order) go to the free old slots
    # (in slot order); there are as many of one as of the other.
    free_slots = torch.sort(taken.to(torch.int8), dim=1, stable=True).indices
    movers = torch.sort(stays.to(torch.int8), dim=1, stable=True).indices
    dest = torch.empty_like(new).scatter_(1, movers, free_slots)
    dest = torch.where(stays, kept_slot, dest)
    result = torch.empty_like(new).scatter_(1, dest, new)
    return result.view(num_layers, num_physical)


def occurrence(rows: torch.Tensor) -> torch.Tensor:
    """For ``[X, n]`` values, how many earlier entries of the same row hold the same value."""
    sorted_values, order = torch.sort(rows, dim=1, stable=True)
    positions = torch.arange(rows.shape[1], device=rows.device).expand_as(rows)
    starts = torch.ones_like(sorted_values, dtype=torch.bool)
    starts[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    run_start = torch.cummax(torch.where(starts, positions, 0), dim=1).values
    return torch.empty_like(rows).scatter_(1, order, positions - run_start)
