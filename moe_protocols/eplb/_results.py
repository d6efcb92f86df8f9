"""What EPLB reports: a model's live tensors, balancedness of a window, what a rearrangement did.

Figures say what was measured. A window with no recorded load has no
balancedness (NaN and ``has_data=False``), never a perfect 1.0; a
rearrangement that did not move anything says why (``skipped``); the
balancedness the last window *realised* (per-slot load as measured) is kept
apart from the balancedness a placement is *planned* to give (each expert's
load split evenly over its replicas).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import attrs
import torch
from torch import Tensor

from ._metrics import balancedness as layer_balancedness
from ._metrics import token_weighted_balancedness

if TYPE_CHECKING:
    from moe_protocols.protocols import MixtureOfExperts

__all__ = [
    "BalancednessStats",
    "ModelEplbState",
    "ModelRearrangement",
    "RearrangementResult",
    "format_bytes",
    "mean_with_data",
    "per_layer_with_data",
]

NAN = math.nan


def format_bytes(count: int) -> str:
    """``count`` bytes in human units: ``"512 B"``, ``"3.4 MiB"``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def per_layer_with_data(rank_load: Tensor, has_load: Tensor) -> Tensor:
    """Per-layer balancedness of ``[L, R]`` rank loads, NaN where ``has_load`` is False."""
    per_layer = layer_balancedness(rank_load)
    return torch.where(has_load, per_layer, torch.full_like(per_layer, NAN))


def mean_with_data(per_layer: Tensor) -> float:
    """Mean over the layers that carry data (non-NaN); NaN when none does."""
    valid = ~torch.isnan(per_layer)
    return float(per_layer[valid].mean()) if bool(valid.any()) else NAN


def _figure(value: float) -> str:
    return "no data" if math.isnan(value) else f"{value:.4f}"


@attrs.frozen(eq=False)
class ModelEplbState:
    """The live EPLB tensors of one registered model.

    The model's MoE layers hold views of these tensors, so they are never
    rebound, only written in place by :class:`EplbState`. Treat them as
    read-only: writing into them changes what the layers route to without
    moving any weight.
    """

    model_name: str
    """Name the model was registered under."""
    model: MixtureOfExperts
    """The registered model (for example a ``MoEView``); its expert weights are moved in place."""
    physical_to_logical_map: Tensor
    """``[L, P]`` int64: logical expert held by each physical slot."""
    logical_to_physical_map: Tensor
    """``[L, E, max_replicas]`` int64: physical slots of each expert, ascending, ``-1`` padded."""
    logical_replica_count: Tensor
    """``[L, E]`` int64: replicas of each expert."""
    expert_load_pass: Tensor
    """``[L, P]`` int32: load the layers recorded since the last ``step()``."""
    expert_load_window: Tensor
    """``[W, L, P]`` int32: the load of the last ``W`` recorded steps (circular)."""
    num_local_physical_experts: int
    """Physical slots per EP rank."""

    @property
    def num_layers(self) -> int:
        """MoE layers ``L``."""
        return int(self.physical_to_logical_map.shape[0])

    @property
    def num_physical_experts(self) -> int:
        """Physical slots ``P``."""
        return int(self.physical_to_logical_map.shape[1])

    @property
    def num_logical_experts(self) -> int:
        """Logical experts ``E``."""
        return int(self.logical_replica_count.shape[1])

    @property
    def max_replicas(self) -> int:
        """Last dimension of ``logical_to_physical_map`` (``P - E + 1``)."""
        return int(self.logical_to_physical_map.shape[2])


@attrs.frozen(eq=False)
class BalancednessStats:
    """How evenly the load recorded in the current window spreads over the EP ranks."""

    model_name: str
    """Model the figures are for."""
    rank_load: Tensor
    """``[L, R]`` int64: token-expert assignments each rank served in the window (all ranks)."""
    per_layer: Tensor
    """``[L]`` float64: mean rank load / max rank load per layer (1.0 = perfect; NaN = no load)."""
    overall: float
    """Mean of ``per_layer`` over layers with load (each counts the same); NaN if none."""
    token_weighted: float
    """``sum(mean) / sum(max)`` over layers: vLLM's logged figure; NaN without load."""
    total_load: int
    """Token-expert assignments in the window (0 = nothing recorded yet)."""

    @property
    def has_data(self) -> bool:
        """Whether any load was recorded; without it the figures are NaN, not a perfect 1.0."""
        return self.total_load > 0

    @classmethod
    def from_rank_load(cls, model_name: str, rank_load: Tensor) -> BalancednessStats:
        """The figures of a measured ``[L, R]`` rank load."""
        per_layer = per_layer_with_data(rank_load, rank_load.sum(dim=1) > 0)
        total = int(rank_load.sum())
        return cls(
            model_name=model_name,
            rank_load=rank_load,
            per_layer=per_layer,
            overall=mean_with_data(per_layer),
            token_weighted=token_weighted_balancedness(rank_load) if total > 0 else NAN,
            total_load=total,
        )

    def __str__(self) -> str:
        if not self.has_data:
            return f"model {self.model_name!r}: no load recorded in the window (no data)"
        return (
            f"model {self.model_name!r}: balancedness {self.overall:.4f} over "
            f"{self.total_load} token-expert assignments in the window"
        )


@attrs.frozen(eq=False)
class ModelRearrangement:
    """What one rearrangement did to one model, and what it measured to decide."""

    model_name: str
    """Model the figures are for."""
    balancedness_before: Tensor
    """``[L]`` float64: planned balancedness of the window's load under the old placement (NaN:
    a layer without load)."""
    balancedness_after: Tensor
    """``[L]`` float64: planned balancedness of the same load under the new placement."""
    overall_balancedness_before: float
    """Mean of ``balancedness_before`` over layers with load (NaN: no data)."""
    overall_balancedness_after: float
    """Mean of ``balancedness_after`` over layers with load (NaN: no data)."""
    slots_changed: int
    """``(layer, slot)`` positions, over all ranks, that hold a different expert now."""
    bytes_moved: int
    """Bytes written into this rank's expert weights (local copies and received rows)."""
    layers_changed: int
    """MoE layers with at least one slot changed on this rank."""
    policy_seconds: float
    """Wall time of the policy call (0 when it was not called)."""
    transfer_seconds: float
    """Wall time of planning, staging and committing the weight move on this rank."""
    old_physical_to_logical_map: Tensor
    """``[L, P]`` int64 CPU copy of the placement before."""
    new_physical_to_logical_map: Tensor
    """``[L, P]`` int64 CPU copy of the placement after."""
    bytes_sent: int = 0
    """Bytes this rank sent to other EP ranks (0 in one process)."""
    bytes_received: int = 0
    """Bytes this rank received from other EP ranks (0 in one process)."""
    total_load: int = 0
    """Token-expert assignments recorded in the window the plan was made from (all ranks)."""
    realised_balancedness: float = NAN
    """Balancedness the window's load actually had, per slot as measured (NaN: no data)."""
    previous_planned_balancedness: float | None = None
    """``overall_balancedness_after`` of the previous rearrangement: what was planned for the
    window that has just been measured (``None`` before the first plan)."""
    skipped: str | None = None
    """Why the policy was not asked for a new placement (``None``: it was)."""
    layers_without_load: tuple[int, ...] = ()
    """MoE layers that recorded nothing in the window; their placement was kept as it was."""

    @property
    def has_data(self) -> bool:
        """Whether the window held any load (a rearrangement on no data never moves weights)."""
        return self.total_load > 0

    def __str__(self) -> str:
        name = f"model {self.model_name!r}"
        if self.skipped is not None:
            return f"{name}: not rearranged: {self.skipped}"
        promised = (
            ""
            if self.previous_planned_balancedness is None
            else f" (planned {_figure(self.previous_planned_balancedness)})"
        )
        text = (
            f"{name}: balancedness realised {_figure(self.realised_balancedness)}{promised} "
            f"on a window of {self.total_load} token-expert assignments; new placement planned "
            f"{_figure(self.overall_balancedness_after)} on the same load (old placement "
            f"{_figure(self.overall_balancedness_before)}); {self.slots_changed} slots changed, "
            f"{format_bytes(self.bytes_moved)} written on this rank"
        )
        if self.layers_without_load:
            text += f"; layers {list(self.layers_without_load)} recorded no load and were kept"
        return text


def _read_only(models: Mapping[str, ModelRearrangement]) -> Mapping[str, ModelRearrangement]:
    return MappingProxyType(dict(models))


@attrs.frozen(eq=False)
class RearrangementResult:
    """The outcome of one :meth:`EplbState.rearrange`, per registered model."""

    models: Mapping[str, ModelRearrangement] = attrs.field(converter=_read_only)
    """Per-model figures, keyed by model name, in registration order."""
    policy: str
    """Name of the policy that planned the placements."""

    def __getitem__(self, model_name: str) -> ModelRearrangement:
        return self.models[model_name]

    @property
    def skipped(self) -> bool:
        """True when no model was rearranged (e.g. the window held no load)."""
        return all(m.skipped is not None for m in self.models.values())

    @property
    def slots_changed(self) -> int:
        """Slots changed over all models."""
        return sum(m.slots_changed for m in self.models.values())

    @property
    def bytes_moved(self) -> int:
        """Bytes written on this rank over all models."""
        return sum(m.bytes_moved for m in self.models.values())

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sent to other EP ranks over all models."""
        return sum(m.bytes_sent for m in self.models.values())

    @property
    def bytes_received(self) -> int:
        """Bytes this rank received from other EP ranks over all models."""
        return sum(m.bytes_received for m in self.models.values())

    def __str__(self) -> str:
        return "\n".join(str(m) for m in self.models.values())
