"""Checking the EPLB tensors a MoE layer is handed, and taking its rows of them.

Every ``MoELayer.set_eplb_state`` receives the model-wide EPLB tensors and
keeps row ``moe_layer_idx`` of each. A layer that keeps a row of the wrong
shape or dtype fails later, in the middle of a forward; this check makes it
fail at registration with a message naming the layer and the tensor. Shared
by the reference models and the transformers adapter, and available to any
model author implementing ``MoELayer``.
"""

from __future__ import annotations

from typing import Final

import attrs
import torch
from torch import Tensor

from moe_protocols.errors import EplbStateError, MappingError

__all__ = ["INDEX_DTYPES", "LOAD_DTYPES", "LayerEplbRows", "layer_eplb_rows"]

LOAD_DTYPES: Final = frozenset({torch.int32, torch.int64, torch.float32, torch.float64})
"""Dtypes a load counter may have (vLLM uses int32)."""

INDEX_DTYPES: Final = frozenset({torch.int16, torch.int32, torch.int64})
"""Dtypes the logical-to-physical map and replica counts may have."""


@attrs.frozen
class LayerEplbRows:
    """One layer's views (not copies) of the live EPLB tensors."""

    expert_load: Tensor
    """``[physical]``: add one per token-expert assignment to the chosen slot."""
    logical_to_physical: Tensor
    """``[logical, max_replicas]``: the slots of each logical expert, -1 padded."""
    replica_count: Tensor
    """``[logical]``: how many slots each logical expert has."""


def _shape(value: object) -> object:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


def layer_eplb_rows(
    name: str,
    moe_layer_idx: int,
    expert_load_view: object,
    logical_to_physical_map: object,
    logical_replica_count: object,
    *,
    num_logical: int,
    num_physical: int,
) -> LayerEplbRows:
    """Check the three model-wide EPLB tensors and return row ``moe_layer_idx`` of each.

    Expected: ``expert_load_view [L, num_physical]`` (a ``LOAD_DTYPES`` dtype),
    ``logical_to_physical_map [L, num_logical, max_replicas >= 1]`` and
    ``logical_replica_count [L, num_logical]`` (``INDEX_DTYPES``), with
    ``0 <= moe_layer_idx < L``. ``name`` says which layer in the messages.

    Raises:
        EplbStateError: the load view or the layer index does not fit.
        MappingError: one of the maps does not fit.
    """
    load = expert_load_view
    if not isinstance(load, Tensor) or load.dim() != 2 or load.shape[1] != num_physical:
        raise EplbStateError(
            f"{name}: expert_load_view must be a [moe_layers, {num_physical}] tensor, "
            f"got {_shape(load)}"
        )
    if load.dtype not in LOAD_DTYPES:
        raise EplbStateError(
            f"{name}: expert_load_view must be int32/int64/float32/float64, got {load.dtype}"
        )
    if type(moe_layer_idx) is not int or not 0 <= moe_layer_idx < load.shape[0]:
        raise EplbStateError(
            f"{name}: moe_layer_idx={moe_layer_idx!r} is outside the {load.shape[0]} rows "
            "of expert_load_view"
        )
    l2p, count = logical_to_physical_map, logical_replica_count
    if (
        not isinstance(l2p, Tensor)
        or l2p.dim() != 3
        or l2p.shape[1] != num_logical
        or l2p.shape[2] < 1
    ):
        raise MappingError(
            f"{name}: logical_to_physical_map must be [moe_layers, {num_logical}, "
            f"max_replicas >= 1], got {_shape(l2p)}"
        )
    if not isinstance(count, Tensor) or count.dim() != 2 or count.shape[1] != num_logical:
        raise MappingError(
            f"{name}: logical_replica_count must be [moe_layers, {num_logical}], "
            f"got {_shape(count)}"
        )
    if moe_layer_idx >= min(l2p.shape[0], count.shape[0]):
        raise MappingError(
            f"{name}: moe_layer_idx={moe_layer_idx} is outside the maps' "
            f"{min(l2p.shape[0], count.shape[0])} layers"
        )
    for what, tensor in (("logical_to_physical_map", l2p), ("logical_replica_count", count)):
        if tensor.dtype not in INDEX_DTYPES:
            raise MappingError(f"{name}: {what} must be int16/32/64, got {tensor.dtype}")
    return LayerEplbRows(load[moe_layer_idx], l2p[moe_layer_idx], count[moe_layer_idx])
