"""Per-step replica dispatch: split each expert's tokens over its replicas by this step's load.

A placement gives a hot expert several replicas on different ranks. Routing
every token of it by a fixed rule (token index modulo the replica count) splits
its load evenly whatever the step looks like, so a rank that also holds a
momentarily busy single-replica expert stays the slowest. Here each step's
per-expert token counts decide the split instead: :func:`replica_shares`
chooses, for every expert, the fraction of its tokens each replica serves so
that the step's largest rank load is (close to) minimal, and
:func:`dispatch_to_replicas` applies those fractions to the tokens.

Method. Rank loads are a fixed part (experts with one usable replica) plus the
splittable part; the set of rank-load vectors reachable by splitting is the
base polytope of a submodular function (Gale's supply-demand theorem), and on
such a set the point of minimum sum of squares also minimises the largest
component (Fujishige 1980; Frank and Murota, "decreasingly minimal" bases).
For one expert, the split that minimises the sum of squares given everything
else is water-filling: fill its replicas' ranks from the least loaded up to a
common level. :func:`replica_shares` runs that update for all experts of all
rows at once (Jacobi), each damped by ``1 / d`` with ``d`` the most splittable
replicas sharing one of its ranks, which makes every round lower the sum of
squares (convexity); it keeps the round with the lowest peak, so the result is
never worse than the even split it starts from. An exact LP is the reference,
not the runtime method: a fixed number of rounds of ~20 tensor ops each, same
shapes every call, no host synchronisation.

Only the routing changes: the maps and EPLB's load recording stay as they are,
and replicas hold the same weights, so model outputs do not change.
"""

from __future__ import annotations

from typing import Final

import torch

from moe_protocols._validate import require_int
from moe_protocols.errors import MappingError

__all__ = [
    "DEFAULT_DISPATCH_ROUNDS",
    "balanced_dispatch",
    "dispatch_to_replicas",
    "rank_loads_from_shares",
    "replica_shares",
]

DEFAULT_DISPATCH_ROUNDS: Final = 8
"""Water-filling rounds per call; each costs about 20 tensor ops whatever the model size."""


def _check_int(what: str, value: object, minimum: int) -> int:
    return require_int(
        value, minimum=minimum, error=MappingError, label=f"replica dispatch: {what}"
    )


def _check_maps(
    logical_to_physical_map: torch.Tensor,
    replica_count: torch.Tensor,
    num_physical: int,
    num_ranks: int,
) -> int:
    """Check shapes and dtypes (metadata only: nothing here waits for the device)."""
    _check_int("num_physical", num_physical, 1)
    _check_int("num_ranks", num_ranks, 1)
    if num_physical % num_ranks != 0:
        raise MappingError(
            f"replica dispatch: {num_physical} physical slots do not split evenly over "
            f"{num_ranks} EP ranks"
        )
    for what, tensor in (
        ("logical_to_physical_map", logical_to_physical_map),
        ("replica_count", replica_count),
    ):
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise MappingError(
                f"replica dispatch: {what} must be an integer tensor, got {tensor.dtype}"
            )
    if logical_to_physical_map.dim() < 2 or logical_to_physical_map.shape[-1] < 1:
        raise MappingError(
            "replica dispatch: logical_to_physical_map must be [..., logical, max_replicas] with "
            f"max_replicas >= 1, got {tuple(logical_to_physical_map.shape)}"
        )
    if tuple(replica_count.shape) != tuple(logical_to_physical_map.shape[:-1]):
        raise MappingError(
            f"replica dispatch: replica_count {tuple(replica_count.shape)} does not match "
            f"logical_to_physical_map {tuple(logical_to_physical_map.shape)} without its last dim"
        )
    return num_physical // num_ranks


def _check_load_shape(logical_load: torch.Tensor, replica_count: torch.Tensor) -> None:
    if tuple(logical_load.shape) != tuple(replica_count.shape):
        raise MappingError(
            f"replica dispatch: logical_load {tuple(logical_load.shape)} does not match "
            f"replica_count {tuple(replica_count.shape)}"
        )


def _usable_replicas(
    l2p: torch.Tensor, count: torch.Tensor, slots: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rank, usable)`` of each ``[rows, logical, width]`` replica entry.

    Padding goes to a dummy rank ``num_ranks`` that nobody waits for; a second
    replica of an expert on the same rank adds nothing, so only the first is usable.
    """
    index = torch.arange(l2p.shape[-1], device=l2p.device)
    valid = (index < count) & (l2p >= 0)
    rank = torch.where(valid, torch.div(l2p.clamp_min(0), slots, rounding_mode="floor"), num_ranks)
    sorted_rank, order = rank.sort(dim=-1, stable=True)
    repeat = torch.zeros_like(valid)
    repeat[..., 1:] = (sorted_rank[..., 1:] == sorted_rank[..., :-1]) & (
        sorted_rank[..., 1:] < num_ranks
    )
    return rank, valid & ~torch.zeros_like(valid).scatter_(-1, order, repeat)


def _rank_loads(weighted: torch.Tensor, flat_rank: torch.Tensor, size: int) -> torch.Tensor:
    """Sum each entry's ``weighted`` load onto its (row, rank) bucket, ``[size]``."""
    total = torch.zeros(size, device=weighted.device, dtype=weighted.dtype)
    return total.index_add_(0, flat_rank, weighted.reshape(-1))


def _relaxation(
    moving: torch.Tensor, flat_rank: torch.Tensor, size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Per expert, how far a round moves its shares: 1 / the most movers sharing one of its ranks.

    Damped so that experts moving load onto the same rank at once do not overshoot.
    """
    movers = moving.to(dtype).reshape(-1)
    degree = torch.zeros(size, device=moving.device, dtype=dtype).index_add_(0, flat_rank, movers)
    degree = torch.where(moving, degree[flat_rank].view_as(moving), 1.0)
    return 1.0 / degree.amax(dim=-1, keepdim=True).clamp_min(1.0)


def replica_shares(
    logical_to_physical_map: torch.Tensor,
    replica_count: torch.Tensor,
    logical_load: torch.Tensor,
    *,
    num_physical: int,
    num_ranks: int,
    num_rounds: int = DEFAULT_DISPATCH_ROUNDS,
) -> torch.Tensor:
    """Fraction of each expert's tokens that each of its replicas should serve this step.

    Args:
        logical_to_physical_map: ``[..., logical, max_replicas]`` slots of each
            expert (``-1`` padded); slot ``p`` lives on rank ``p // (P / R)``.
            Leading dims (layers, or steps x layers) are batched.
        replica_count: ``[..., logical]`` replicas of each expert; entries of
            the map at or beyond the count are ignored.
        logical_load: ``[..., logical]`` tokens routed to each expert in this
            step (counts or any non-negative reals), summed over EP ranks.
        num_physical: physical slots per layer ``P``.
        num_ranks: EP ranks ``R``; divides ``P``.
        num_rounds: water-filling rounds (>= 0; 0 returns the even split).

    Returns:
        ``[..., logical, max_replicas]`` float shares on the map's device
        (``logical_load``'s dtype if floating, else float32): zero on padded
        entries and on a second replica of an expert on the same rank, the
        rest non-negative and summing to 1 per expert. The largest rank load
        is never above the even split's.

    Raises:
        MappingError: shapes, dtypes or counts disagree. Values are not read
            (that would wait for the device): the maps are checked where they
            are set, by EPLB.
    """
    slots = _check_maps(logical_to_physical_map, replica_count, num_physical, num_ranks)
    _check_int("num_rounds", num_rounds, 0)
    _check_load_shape(logical_load, replica_count)
    *lead, num_logical, width = logical_to_physical_map.shape
    device = logical_to_physical_map.device
    dtype = logical_load.dtype if logical_load.dtype.is_floating_point else torch.float32
    l2p = logical_to_physical_map.reshape(-1, num_logical, width)
    rows = l2p.shape[0]
    load = logical_load.reshape(rows, num_logical, 1).to(device=device, dtype=dtype)
    count = replica_count.reshape(rows, num_logical, 1).to(device)

    rank, usable = _usable_replicas(l2p, count, slots, num_ranks)
    num_usable = usable.sum(dim=-1, keepdim=True)
    share = usable.to(dtype) / num_usable.clamp_min(1).to(dtype)
    splittable = (num_usable > 1) & (load > 0)

    stride = num_ranks + 1
    flat_rank = (rank + torch.arange(rows, device=device).view(rows, 1, 1) * stride).reshape(-1)
    relax = _relaxation(usable & splittable, flat_rank, rows * stride, dtype)
    levels = torch.arange(1, width + 1, device=device, dtype=dtype)
    safe_load = torch.where(load > 0, load, 1.0)

    totals = _rank_loads(load * share, flat_rank, rows * stride)
    best = share
    best_peak = totals.view(rows, stride)[:, :num_ranks].amax(dim=1)
    for _ in range(num_rounds):
        # Load on each replica's rank from everything but this expert.
        # A Python scalar, not a tensor made on the host: that copy would wait for the device.
        other = torch.where(usable, totals[flat_rank].view_as(share) - load * share, float("inf"))
        ordered = other.sort(dim=-1).values
        level = (load + ordered.cumsum(dim=-1)) / levels
        # Water-filling: the level rises over the k least loaded ranks while it stays above them.
        filled = (ordered < level).sum(dim=-1, keepdim=True).clamp_min(1)
        water = level.gather(-1, filled - 1)
        target = torch.where(usable, (water - other).clamp_min(0.0) / safe_load, 0.0)
        share = torch.where(splittable, share + relax * (target - share), share)
        totals = _rank_loads(load * share, flat_rank, rows * stride)
        peak = totals.view(rows, stride)[:, :num_ranks].amax(dim=1)
        better = (peak < best_peak).view(rows, 1, 1)
        best = torch.where(better, share, best)
        best_peak = torch.minimum(peak, best_peak)
    return best.reshape(*lead, num_logical, width)


def rank_loads_from_shares(
    logical_to_physical_map: torch.Tensor,
    logical_load: torch.Tensor,
    shares: torch.Tensor,
    *,
    num_physical: int,
    num_ranks: int,
) -> torch.Tensor:
    """``[..., ranks]`` load when each expert's ``logical_load`` is split by ``shares``.

    Shapes as in :func:`replica_shares`; entries with a zero share (padding
    included) add nothing.
    """
    slots = num_physical // _check_int("num_ranks", num_ranks, 1)
    *lead, num_logical, width = logical_to_physical_map.shape
    l2p = logical_to_physical_map.reshape(-1, num_logical * width)
    rows = l2p.shape[0]
    part = (
        logical_load.reshape(rows, num_logical, 1) * shares.reshape(rows, num_logical, width)
    ).to(shares.dtype)
    rank = torch.div(l2p.clamp_min(0), slots, rounding_mode="floor")
    out = torch.zeros(rows, num_ranks, device=shares.device, dtype=shares.dtype)
    out.scatter_add_(1, rank, part.reshape(rows, -1))
    return out.reshape(*lead, num_ranks)


def dispatch_to_replicas(
    logical_ids: torch.Tensor, logical_to_physical: torch.Tensor, shares: torch.Tensor
) -> torch.Tensor:
    """Physical slot of each ``(token, k)`` choice so that each expert's replicas get their shares.

    The routing rule: expert ``e``'s ``n`` choices are cut into consecutive
    runs (in flat token order), replica ``j`` taking
    ``round(c_j n) - round(c_{j-1} n)`` of them, with ``c_j`` the cumulative
    share up to ``j``. Each replica therefore serves its share of the choices to
    within one; a replica with a zero share (padding included) gets none.
    Deterministic, fixed shapes, no host synchronisation (one stable sort of
    the choices and one ``repeat_interleave`` with a known output size).

    Args:
        logical_ids: ``[tokens, top_k]`` chosen logical experts of one layer.
        logical_to_physical: ``[logical, max_replicas]`` that layer's slots.
        shares: ``[logical, max_replicas]`` from :func:`replica_shares`.

    Returns:
        ``[tokens, top_k]`` int64 physical slots.

    Raises:
        MappingError: shapes or dtypes disagree.
    """
    if logical_ids.dim() != 2 or logical_ids.dtype.is_floating_point:
        raise MappingError(
            f"replica dispatch: logical_ids must be an integer [tokens, top_k] tensor, "
            f"got {logical_ids.dtype} {tuple(logical_ids.shape)}"
        )
    if logical_to_physical.dim() != 2 or tuple(shares.shape) != tuple(logical_to_physical.shape):
        raise MappingError(
            f"replica dispatch: logical_to_physical {tuple(logical_to_physical.shape)} and "
            f"shares {tuple(shares.shape)} must be the same [logical, max_replicas] shape"
        )
    num_logical, width = logical_to_physical.shape
    flat = logical_ids.reshape(-1).to(torch.int64)
    num_choices = flat.shape[0]
    device = flat.device
    # index_add_ rather than bincount: bincount sizes its output from the data (a host sync).
    counts = torch.zeros(num_logical, device=device, dtype=torch.int64)
    counts.index_add_(0, flat, torch.ones_like(flat))
    index = torch.arange(width, device=device)
    last = torch.where(shares > 0, index, 0).amax(dim=-1, keepdim=True)
    # Cumulative shares, exactly 1 from the last served replica on, so the runs cover every choice.
    cum = torch.where(index >= last, 1.0, shares.to(torch.float64).cumsum(dim=-1))
    bounds = torch.round(cum * counts.unsqueeze(-1).to(torch.float64)).to(torch.int64)
    runs = torch.diff(bounds, dim=-1, prepend=torch.zeros_like(bounds[:, :1]))
    # Choices sorted by expert (stable: token order within an expert) take the runs in order.
    order = torch.argsort(flat, stable=True)
    slots = torch.repeat_interleave(
        logical_to_physical.to(torch.int64).reshape(-1), runs.reshape(-1), output_size=num_choices
    )
    physical = torch.empty_like(flat)
    physical[order] = slots
    return physical.view_as(logical_ids)


def balanced_dispatch(
    logical_ids: torch.Tensor,
    logical_to_physical: torch.Tensor,
    replica_count: torch.Tensor,
    *,
    num_physical: int,
    num_ranks: int,
    num_rounds: int = DEFAULT_DISPATCH_ROUNDS,
) -> torch.Tensor:
    """Route one layer's ``[tokens, top_k]`` choices to slots, replicas split by this step's load.

    Counts the choices per expert, computes :func:`replica_shares` and applies
    them with :func:`dispatch_to_replicas`. The counts are the local batch's:
    when EP ranks see different tokens, all-reduce the counts and call the two
    functions directly, so that every rank uses the same shares.
    """
    num_logical = logical_to_physical.shape[0] if logical_to_physical.dim() == 2 else -1
    if num_logical < 0:
        raise MappingError(
            "replica dispatch: logical_to_physical must be [logical, max_replicas], got "
            f"{tuple(logical_to_physical.shape)}"
        )
    flat = logical_ids.reshape(-1).to(torch.int64)
    counts = torch.zeros(num_logical, device=flat.device, dtype=torch.float32)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    shares = replica_shares(
        logical_to_physical.unsqueeze(0),
        replica_count.unsqueeze(0),
        counts.unsqueeze(0),
        num_physical=num_physical,
        num_ranks=num_ranks,
        num_rounds=num_rounds,
    )[0]
    return dispatch_to_replicas(logical_ids, logical_to_physical, shares)
