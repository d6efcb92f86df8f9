"""Expert placement maps: the initial placement, the inverse maps, and validation.

A placement is a ``physical_to_logical_map [layers, physical]`` (int64): slot
``p`` of layer ``l`` holds logical expert ``map[l, p]``. Slots are laid out
rank-major: with ``R`` EP ranks, slot ``p`` lives on rank ``p // (P // R)``.
A slot holding ``-1`` is empty (elastic EP); the inverse maps ignore it.
"""

from __future__ import annotations

from typing import Final

import torch

from moe_protocols.errors import MappingError

from . import _limits

__all__ = [
    "compute_logical_maps",
    "initial_physical_to_logical_map",
    "initial_placement",
    "max_replicas",
    "validate_placement",
]

# Dtypes a placement may arrive in. bool is excluded on purpose: True/False are
# not expert ids. uint64 is excluded because torch supports few ops on it and
# its values may not fit int64.
_INTEGER_DTYPES: Final = frozenset(
    {
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint16,
        torch.uint32,
    }
)


def _check_counts(num_logical: int, num_physical: int) -> None:
    if num_logical < 1:
        raise MappingError(f"num_logical must be >= 1, got {num_logical}")
    if num_physical < num_logical:
        raise MappingError(
            f"num_physical={num_physical} is smaller than num_logical={num_logical}: "
            "every logical expert needs at least one physical slot"
        )
    _limits.check_count("num_logical", num_logical, "MAX_LOGICAL_EXPERTS", MappingError)
    _limits.check_count("num_physical", num_physical, "MAX_PHYSICAL_SLOTS", MappingError)


def initial_physical_to_logical_map(num_logical: int, num_physical: int) -> list[int]:
    """The placement every layer starts from: ``[0..E-1]`` then redundant slots round-robin.

    Slot ``p < E`` holds expert ``p``; redundant slot ``E + i`` holds expert
    ``i % E``. Same rule as vLLM's ``build_initial_global_physical_to_logical_map``.
    """
    _check_counts(num_logical, num_physical)
    return list(range(num_logical)) + [i % num_logical for i in range(num_physical - num_logical)]


def initial_placement(num_layers: int, num_logical: int, num_physical: int) -> torch.Tensor:
    """The initial ``physical_to_logical_map [layers, physical]`` (int64), one row per layer."""
    if num_layers < 1:
        raise MappingError(f"num_layers must be >= 1, got {num_layers}")
    _limits.check_count("num_layers", num_layers, "MAX_LAYERS", MappingError)
    row = torch.tensor(
        initial_physical_to_logical_map(num_logical, num_physical), dtype=torch.int64
    )
    return row.unsqueeze(0).repeat(num_layers, 1)


def max_replicas(num_logical: int, num_physical: int) -> int:
    """The most replicas one logical expert can have: ``P - E + 1``.

    Used as the fixed last dimension of ``logical_to_physical_map`` so that the
    tensor can be updated in place after every rearrangement.
    """
    _check_counts(num_logical, num_physical)
    return num_physical - num_logical + 1


def _check_inversion(p2l: torch.Tensor, num_logical: int, max_replicas: int) -> None:
    """Refuse a map :func:`compute_logical_maps` cannot invert, or whose result is over a limit."""
    if p2l.dim() != 2:
        raise MappingError(
            f"physical_to_logical_map must be [layers, physical], got shape {tuple(p2l.shape)}"
        )
    if p2l.dtype not in _INTEGER_DTYPES:
        raise MappingError(
            f"physical_to_logical_map must hold integer expert ids, got dtype {p2l.dtype}"
        )
    if num_logical < 1 or max_replicas < 1:
        raise MappingError(
            f"num_logical and max_replicas must be >= 1, got {num_logical} and {max_replicas}"
        )
    num_layers, num_physical = p2l.shape
    _limits.check_count("physical_to_logical_map: layers", num_layers, "MAX_LAYERS", MappingError)
    _limits.check_count(
        "physical_to_logical_map: slots", num_physical, "MAX_PHYSICAL_SLOTS", MappingError
    )
    _limits.check_count("max_replicas", max_replicas, "MAX_PHYSICAL_SLOTS", MappingError)
    _limits.check_product(
        "logical_to_physical_map",
        (num_layers, num_logical, max_replicas),
        "MAX_REPLICA_MAP_ENTRIES",
        MappingError,
    )


def compute_logical_maps(
    physical_to_logical_map: torch.Tensor, num_logical: int, max_replicas: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert a placement into the maps the MoE layers read when routing.

    Args:
        physical_to_logical_map: ``[layers, physical]`` integer tensor; ``-1``
            marks an empty slot and is ignored.
        num_logical: number of logical experts ``E``.
        max_replicas: last dimension of the result (use :func:`max_replicas`).

    Returns:
        ``(logical_to_physical_map, logical_replica_count)``:
        ``[layers, logical, max_replicas]`` int64 holding the physical slots of
        each expert in ascending slot order, padded with ``-1``; and
        ``[layers, logical]`` int64 replica counts. Both on the input's device.

    Raises:
        MappingError: the map is not 2-D, holds ids outside ``[-1, E)``, or
            some expert has more than ``max_replicas`` replicas.
    """
    p2l = physical_to_logical_map
    _check_inversion(p2l, num_logical, max_replicas)
    num_layers, num_physical = p2l.shape
    device = p2l.device
    p2l = p2l.to(torch.int64)
    bad = (p2l < -1) | (p2l >= num_logical)
    if bool(bad.any()):
        layer, slot = (int(i) for i in bad.nonzero()[0])
        raise MappingError(
            f"physical_to_logical_map: layer {layer}, slot {slot} holds {int(p2l[layer, slot])}, "
            f"outside [-1, {num_logical})"
        )
    # Empty slots get the sentinel id E so that they sort last and land in a
    # throw-away column.
    keys = torch.where(p2l < 0, num_logical, p2l)
    # A stable sort keeps the replicas of one expert in ascending slot order.
    sorted_keys, sorted_slots = torch.sort(keys, dim=1, stable=True)
    counts = torch.zeros(num_layers, num_logical + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(1, keys, torch.ones_like(keys))
    logical_replica_count = counts[:, :num_logical].contiguous()
    too_many = logical_replica_count > max_replicas
    if bool(too_many.any()):
        layer, expert = (int(i) for i in too_many.nonzero()[0])
        raise MappingError(
            f"physical_to_logical_map: layer {layer}, logical expert {expert} has "
            f"{int(logical_replica_count[layer, expert])} replicas, more than "
            f"max_replicas={max_replicas}"
        )
    # Replica index of each sorted slot = its position minus where its expert's run starts.
    run_start = torch.cumsum(counts, dim=1) - counts
    positions = torch.arange(num_physical, device=device).expand(num_layers, -1)
    replica = positions - run_start.gather(1, sorted_keys)
    valid = sorted_keys < num_logical
    layer_ids = torch.arange(num_layers, device=device).unsqueeze(1).expand_as(sorted_keys)
    logical_to_physical_map = torch.full(
        (num_layers, num_logical, max_replicas), -1, dtype=torch.int64, device=device
    )
    logical_to_physical_map[layer_ids[valid], sorted_keys[valid], replica[valid]] = sorted_slots[
        valid
    ]
    return logical_to_physical_map, logical_replica_count


def _check_placement_topology(num_logical: int, num_ranks: int, num_nodes: int, what: str) -> None:
    """Refuse expert and rank counts no placement can be checked against."""
    if num_logical < 1:
        raise MappingError(f"{what}: num_logical must be >= 1, got {num_logical}")
    if num_ranks < 1 or num_nodes < 1 or num_ranks % num_nodes != 0:
        raise MappingError(
            f"{what}: num_ranks={num_ranks} must be >= 1 and a multiple of num_nodes={num_nodes}"
        )
    for name, value, limit in (
        ("num_logical", num_logical, "MAX_LOGICAL_EXPERTS"),
        ("num_ranks", num_ranks, "MAX_RANKS"),
        ("num_nodes", num_nodes, "MAX_NODES"),
    ):
        _limits.check_count(f"{what}: {name}", value, limit, MappingError)


def _dense_table(physical_to_logical_map: object, what: str) -> torch.Tensor:
    """The object as a dense 2-D integer tensor within the map limits, or a ``MappingError``."""
    if not isinstance(physical_to_logical_map, torch.Tensor):
        raise MappingError(
            f"{what}: expected a torch.Tensor [layers, physical], "
            f"got {type(physical_to_logical_map).__name__}"
        )
    tensor = physical_to_logical_map
    if tensor.layout != torch.strided or tensor.is_nested or tensor.device.type == "meta":
        raise MappingError(
            f"{what}: expected a dense tensor with data, got layout {tensor.layout} "
            f"on device {tensor.device}"
        )
    if tensor.dim() != 2:
        raise MappingError(
            f"{what}: expected 2 dimensions [layers, physical], got shape {tuple(tensor.shape)}"
        )
    if tensor.dtype not in _INTEGER_DTYPES:
        raise MappingError(
            f"{what}: expected an integer dtype holding expert ids, got {tensor.dtype}"
        )
    layers, physical = tensor.shape
    if layers < 1:
        raise MappingError(f"{what}: has no layers (shape {tuple(tensor.shape)})")
    _limits.check_count(f"{what}: layers", layers, "MAX_LAYERS", MappingError)
    _limits.check_count(f"{what}: physical slots", physical, "MAX_PHYSICAL_SLOTS", MappingError)
    _limits.check_product(f"{what}", (layers, physical), "MAX_MAP_ENTRIES", MappingError)
    return tensor


def validate_placement(
    physical_to_logical_map: object,
    *,
    num_layers: int | None,
    num_logical: int,
    num_physical: int | None,
    num_ranks: int,
    num_nodes: int = 1,
    what: str = "placement",
) -> torch.Tensor:
    """Check that an object is a usable placement and return it as int64 on CPU.

    Args:
        physical_to_logical_map: candidate ``[layers, physical]`` integer tensor.
        num_layers: expected number of MoE layers, or ``None`` to accept any (>= 1).
        num_logical: number of logical experts ``E``; ids must lie in ``[0, E)``.
        num_physical: expected number of physical slots, or ``None`` to accept any.
        num_ranks: EP ranks; the slot count must be a multiple of it.
        num_nodes: nodes; ``num_ranks`` must be a multiple of it.
        what: name of the object in error messages (e.g. a file name).

    Returns:
        A contiguous int64 CPU copy (the input is never modified).

    Raises:
        MappingError: for anything that is not a valid placement; the message
            names ``what`` and the layer and slot or expert at fault.
    """
    _check_placement_topology(num_logical, num_ranks, num_nodes, what)
    tensor = _dense_table(physical_to_logical_map, what)
    layers, physical = tensor.shape
    if num_layers is not None and layers != num_layers:
        raise MappingError(f"{what}: has {layers} layers, expected {num_layers}")
    if num_physical is not None and physical != num_physical:
        raise MappingError(f"{what}: has {physical} physical slots, expected {num_physical}")
    if physical % num_ranks != 0:
        raise MappingError(
            f"{what}: {physical} physical slots do not split evenly over {num_ranks} EP ranks"
        )
    if physical < num_logical:
        raise MappingError(
            f"{what}: {physical} physical slots cannot hold {num_logical} logical experts"
        )
    # copy=True: the result never aliases the caller's tensor.
    result = tensor.detach().to(device="cpu", dtype=torch.int64, copy=True).contiguous()
    bad = (result < 0) | (result >= num_logical)
    if bool(bad.any()):
        layer, slot = (int(i) for i in bad.nonzero()[0])
        raise MappingError(
            f"{what}: layer {layer}, slot {slot} holds {int(result[layer, slot])}, "
            f"not a logical expert id in [0, {num_logical})"
        )
    present = torch.zeros(layers, num_logical, dtype=torch.bool)
    present.scatter_(1, result, True)
    if not bool(present.all()):
        layer, expert = (int(i) for i in (~present).nonzero()[0])
        raise MappingError(f"{what}: layer {layer}, logical expert {expert} has no replica")
    return result
