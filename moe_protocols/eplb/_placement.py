"""A saved expert placement as a value: a checked ``[layers, physical]`` map and its topology.

:mod:`._mapping_io` writes it to and reads it from a file; the EPLB state
builds one from its current maps and restores one with ``update_mapping``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import cast

import attrs
import torch
from torch import Tensor

from moe_protocols._validate import is_int
from moe_protocols.errors import MappingError

from . import _limits
from ._maps import validate_placement

__all__ = ["Placement", "is_count"]


is_count = is_int
"""Whether ``value`` is an ``int`` and not a ``bool`` (``_validate.is_int``)."""


def _positive_count(instance: Placement, attribute: attrs.Attribute[int], value: object) -> None:
    if not is_count(value) or value < 1:
        raise MappingError(f"Placement.{attribute.name} must be an int >= 1, got {value!r}")


def _to_int64_cpu(value: object) -> object:
    # Integer tensors are copied to int64 on the CPU so a Placement never aliases
    # live EPLB state. Anything else passes through for the validator to reject
    # (a float or bool tensor is not silently turned into expert ids).
    # A tensor over the map limit (an expanded view claims any size) is not
    # copied either: the validator refuses it by its shape.
    if (
        isinstance(value, Tensor)
        and value.numel() <= _limits.MAX_MAP_ENTRIES
        and not (value.dtype == torch.bool or value.is_floating_point() or value.is_complex())
    ):
        return value.detach().to(device="cpu", dtype=torch.int64, copy=True).contiguous()
    return value


def _frozen_metadata(value: object) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise MappingError(
            f"Placement.metadata must be a mapping of str to str, got {type(value).__name__}"
        )
    entries = cast("Mapping[object, object]", value)
    checked: dict[str, str] = {}
    for key, item in entries.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise MappingError(f"Placement.metadata must map str to str, got {key!r}: {item!r}")
        checked[key] = item
    return MappingProxyType(checked)


def _check_nodes(instance: Placement, attribute: attrs.Attribute[int], value: int) -> None:
    _positive_count(instance, attribute, value)
    if instance.num_ranks % value != 0:
        raise MappingError(
            f"Placement.num_nodes={value} must divide num_ranks={instance.num_ranks}"
        )


@attrs.frozen
class Placement:
    """A saved expert placement: which logical expert every physical slot of every layer holds.

    Validated on construction: ``physical_to_logical_map`` is ``[layers, physical]``
    with ids in ``[0, num_logical_experts)``, every expert has a replica in every
    layer, and the slots split evenly over ``num_ranks`` ranks (rank-major). The
    map is stored as an int64 CPU copy; placements compare equal when their maps
    and fields are equal.
    """

    physical_to_logical_map: Tensor = attrs.field(
        # The converter passes a non-tensor through for validate_placement to reject.
        converter=_to_int64_cpu,  # pyright: ignore[reportGeneralTypeIssues]  # returns object, see above
        eq=attrs.cmp_using(eq=torch.equal),
        hash=False,
    )
    """``[layers, physical]`` int64: slot ``p`` of layer ``l`` holds expert ``map[l, p]``."""
    num_logical_experts: int = attrs.field(validator=_positive_count)
    """Logical experts ``E`` of the model the placement is for."""
    num_ranks: int = attrs.field(default=1, validator=_positive_count)
    """EP ranks the slots are spread over; slot ``p`` lives on rank ``p // (P // R)``."""
    num_nodes: int = attrs.field(default=1, validator=_check_nodes)
    """Nodes the ranks were spread over when the placement was computed (informational)."""
    metadata: Mapping[str, str] = attrs.field(
        factory=dict[str, str], converter=_frozen_metadata, hash=False
    )
    """Free-form string annotations (model name, policy, date, ...)."""

    def __attrs_post_init__(self) -> None:
        # After the field validators, so the counts it relies on are known good.
        validate_placement(
            self.physical_to_logical_map,
            num_layers=None,
            num_logical=self.num_logical_experts,
            num_physical=None,
            num_ranks=self.num_ranks,
            num_nodes=self.num_nodes,
            what="Placement.physical_to_logical_map",
        )

    @property
    def num_layers(self) -> int:
        """MoE layers ``L``."""
        return int(self.physical_to_logical_map.shape[0])

    @property
    def num_physical_experts(self) -> int:
        """Physical slots ``P`` per layer."""
        return int(self.physical_to_logical_map.shape[1])
