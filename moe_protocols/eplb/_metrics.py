"""How good a placement is: load per EP rank, balancedness, and slots moved.

Balancedness is mean rank load / max rank load: 1.0 is perfect, ``1 / R``
means one rank does all the work. Step time is set by the slowest rank, so
this is the fraction of the EP group's capacity that is actually used.
"""

from __future__ import annotations

import torch

from moe_protocols.errors import MappingError

from . import _limits

__all__ = [
    "balancedness",
    "expected_rank_loads",
    "overall_balancedness",
    "rank_loads_from_physical",
    "refetched_per_rank",
    "slots_changed",
    "slots_refetched",
    "token_weighted_balancedness",
]


def _slots_per_rank(num_physical: int, num_ranks: int, what: str) -> int:
    if num_ranks < 1 or num_physical % num_ranks != 0:
        raise MappingError(
            f"{what}: {num_physical} physical slots do not split evenly over {num_ranks} EP ranks"
        )
    return num_physical // num_ranks


def _check_2d(tensor: torch.Tensor, what: str, dims: str) -> None:
    if tensor.dim() != 2:
        raise MappingError(f"{what} must be {dims}, got shape {tuple(tensor.shape)}")


def rank_loads_from_physical(physical_load: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Sum a measured ``[layers, physical]`` load over each rank's slots into ``[layers, ranks]``.

    Keeps the input's device; integer loads stay integer (int64 after the sum).
    """
    _check_2d(physical_load, "physical_load", "[layers, physical]")
    num_layers, num_physical = physical_load.shape
    slots = _slots_per_rank(num_physical, num_ranks, "physical_load")
    return physical_load.reshape(num_layers, num_ranks, slots).sum(dim=2)


def expected_rank_loads(
    physical_to_logical_map: torch.Tensor, logical_load: torch.Tensor, num_ranks: int
) -> torch.Tensor:
    """The ``[layers, ranks]`` load a placement would see, each expert's load split evenly.

    Args:
        physical_to_logical_map: ``[layers, physical]`` placement (``-1`` = empty slot).
        logical_load: ``[layers, logical]`` load per logical expert.
        num_ranks: EP ranks; divides ``physical``.

    Returns:
        ``[layers, ranks]`` float64 on CPU; an expert with ``c`` replicas puts
        ``load / c`` on the rank of each replica.

    Raises:
        MappingError: shapes disagree, ids lie outside ``[-1, E)``, or an
            expert with non-zero load has no replica (its load would vanish).
    """
    _check_2d(physical_to_logical_map, "physical_to_logical_map", "[layers, physical]")
    _check_2d(logical_load, "logical_load", "[layers, logical]")
    num_layers, num_physical = physical_to_logical_map.shape
    if logical_load.shape[0] != num_layers:
        raise MappingError(
            f"logical_load has {logical_load.shape[0]} layers, the placement has {num_layers}"
        )
    num_logical = logical_load.shape[1]
    slots = _slots_per_rank(num_physical, num_ranks, "physical_to_logical_map")
    p2l = physical_to_logical_map.detach().to(device="cpu", dtype=torch.int64)
    load = logical_load.detach().to(device="cpu", dtype=torch.float64)
    bad = (p2l < -1) | (p2l >= num_logical)
    if bool(bad.any()):
        layer, slot = (int(i) for i in bad.nonzero()[0])
        raise MappingError(
            f"physical_to_logical_map: layer {layer}, slot {slot} holds {int(p2l[layer, slot])}, "
            f"outside [-1, {num_logical})"
        )
    # Empty slots point at an extra zero-load column.
    ids = torch.where(p2l < 0, num_logical, p2l)
    counts = torch.zeros(num_layers, num_logical + 1, dtype=torch.float64)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))
    lost = (counts[:, :num_logical] == 0) & (load != 0)
    if bool(lost.any()):
        layer, expert = (int(i) for i in lost.nonzero()[0])
        raise MappingError(
            f"physical_to_logical_map: layer {layer}, logical expert {expert} has load "
            f"{float(load[layer, expert])} but no replica"
        )
    per_replica = torch.cat([load, torch.zeros(num_layers, 1, dtype=torch.float64)], dim=1)
    per_replica = per_replica / counts.clamp(min=1)
    return per_replica.gather(1, ids).view(num_layers, num_ranks, slots).sum(dim=2)


def balancedness(rank_load: torch.Tensor) -> torch.Tensor:
    """Per-layer ``mean / max`` of a ``[layers, ranks]`` load, as float64 ``[layers]``.

    A layer with no load at all counts as perfectly balanced (1.0): no rank
    waits for another. Loads are assumed non-negative.
    """
    _check_2d(rank_load, "rank_load", "[layers, ranks]")
    load = rank_load.detach().to(torch.float64)
    peak = load.amax(dim=1)
    mean = load.mean(dim=1)
    return torch.where(peak > 0, mean / torch.where(peak > 0, peak, 1.0), 1.0)


def overall_balancedness(rank_load: torch.Tensor) -> float:
    """Mean over layers of the per-layer :func:`balancedness` (SGLang's aggregate).

    Every layer counts the same, however much load it carries.
    """
    return float(balancedness(rank_load).mean())


def token_weighted_balancedness(rank_load: torch.Tensor) -> float:
    """``sum_layers(mean rank load) / sum_layers(max rank load)`` (vLLM's logged aggregate).

    The right figure when a step takes the sum over layers of the slowest
    rank's time: heavy layers weigh more. 1.0 when there is no load at all
    (vLLM logs 0.0 in that case).
    """
    _check_2d(rank_load, "rank_load", "[layers, ranks]")
    load = rank_load.detach().to(torch.float64)
    total_peak = float(load.amax(dim=1).sum())
    return float(load.mean(dim=1).sum()) / total_peak if total_peak > 0 else 1.0


def slots_changed(old_map: torch.Tensor, new_map: torch.Tensor) -> int:
    """How many ``(layer, slot)`` positions hold a different logical expert after a rebalance.

    Raises:
        MappingError: the two maps have different shapes.
    """
    if old_map.shape != new_map.shape:
        raise MappingError(
            f"cannot compare placements of shapes {tuple(old_map.shape)} and {tuple(new_map.shape)}"
        )
    return int((old_map.cpu() != new_map.cpu()).sum())


def refetched_per_rank(
    old_map: torch.Tensor, new_map: torch.Tensor, num_ranks: int
) -> torch.Tensor:
    """``[layers, ranks]`` slots each rank must fetch from another rank after a rebalance.

    Per (layer, rank), an expert held ``n_old`` times before and ``n_new``
    times after needs ``max(0, n_new - n_old)`` copies fetched from elsewhere;
    reshuffles inside a rank are local copies and do not count. The largest
    row sum over ranks times the expert size is what the slowest rank receives.

    Raises:
        MappingError: the maps differ in shape, their slots do not split over
            ``num_ranks``, or they hold an id of ``MAX_LOGICAL_EXPERTS`` or above.
    """
    if old_map.shape != new_map.shape or old_map.dim() != 2:
        raise MappingError(
            f"cannot compare placements of shapes {tuple(old_map.shape)} and {tuple(new_map.shape)}"
        )
    num_layers, num_physical = new_map.shape
    slots = _slots_per_rank(num_physical, num_ranks, "physical_to_logical_map")
    old = old_map.detach().to(device="cpu", dtype=torch.int64).reshape(-1, slots)
    new = new_map.detach().to(device="cpu", dtype=torch.int64).reshape(-1, slots)
    if bool((old < -1).any() or (new < -1).any()):
        raise MappingError("placements may hold only expert ids >= 0 and -1 for an empty slot")
    # Shift ids by one so that empty slots (-1) get their own column 0.
    width = int(torch.maximum(old.max(), new.max())) + 2 if old.numel() else 1
    # The histograms are that wide: an id of 2**40 must not size them.
    _limits.check_count("the largest expert id + 1", width - 1, "MAX_LOGICAL_EXPERTS", MappingError)
    ones = torch.ones_like(new)
    old_hist = torch.zeros(num_layers * num_ranks, width, dtype=torch.int64)
    new_hist = torch.zeros_like(old_hist)
    old_hist.scatter_add_(1, old + 1, ones)
    new_hist.scatter_add_(1, new + 1, ones)
    fetched = (new_hist[:, 1:] - old_hist[:, 1:]).clamp(min=0).sum(dim=1)
    return fetched.view(num_layers, num_ranks)


def slots_refetched(old_map: torch.Tensor, new_map: torch.Tensor, num_ranks: int) -> int:
    """How many slots need expert weights from another rank after a rebalance.

    The total of :func:`refetched_per_rank`: per (layer, rank), an expert held
    ``n_old`` times before and ``n_new`` times after needs
    ``max(0, n_new - n_old)`` copies fetched from elsewhere; reshuffles inside
    a rank are local copies and do not count.

    Raises:
        MappingError: the maps differ in shape or their slots do not split over ``num_ranks``.
    """
    return int(refetched_per_rank(old_map, new_map, num_ranks).sum())
