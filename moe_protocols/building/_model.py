"""The model side of the EPLB contract, derived from the model's MoE layers.

``MoEModelMixin`` gives a model every ``MixtureOfExperts`` member: the
author calls ``self.init_moe_layers(layers)`` once the layers exist, and
every count is read from them (no count is written by hand), checked to
agree across layers and kept consistent by ``update_physical_experts_metadata``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from moe_protocols._validate import require_int
from moe_protocols.errors import EplbConfigError, EplbStateError
from moe_protocols.protocols import MixtureOfExperts, MoELayer

if TYPE_CHECKING:
    from collections.abc import MutableSequence

    from torch import Tensor

__all__ = ["ElasticMoELayer", "MoEModelMixin"]


@runtime_checkable
class ElasticMoELayer(MoELayer, Protocol):
    """A ``MoELayer`` that tells its slot counts and can adopt new ones (as ``StackedExperts``)."""

    @property
    def num_logical_experts(self) -> int:
        """Experts the router chooses among."""
        ...

    @property
    def num_physical_experts(self) -> int:
        """Expert slots over all EP ranks."""
        ...

    @property
    def num_local_physical_experts(self) -> int:
        """Expert slots held on this rank."""
        ...

    def check_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        """Raise (changing nothing) unless the layer can adopt these counts."""
        ...

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        """Adopt new slot counts (after ``check_physical_experts_metadata`` accepted them)."""
        ...


def _non_negative(what: str, value: object) -> int:
    return require_int(
        value, minimum=0, error=EplbConfigError, label=f"MoEModelMixin.init_moe_layers: {what}"
    )


class MoEModelMixin(MixtureOfExperts):
    """Implements ``MixtureOfExperts`` for a model from the MoE layers it is given.

    Subclass it next to ``nn.Module`` (``class MyLM(nn.Module, MoEModelMixin)``)
    and call :meth:`init_moe_layers` at the end of ``__init__``. The counts
    are plain attributes afterwards (EPLB reads them, elastic EP writes them
    through :meth:`update_physical_experts_metadata`); ``set_eplb_state`` is
    the protocol's own (it collects ``expert_weights`` from the layers).
    """

    _elastic_layers: tuple[ElasticMoELayer, ...]

    def init_moe_layers(
        self,
        layers: Iterable[object],
        *,
        num_shared_experts: int = 0,
        num_expert_groups: int = 1,
    ) -> None:
        """Adopt ``layers`` (in layer order) as the model's MoE layers and derive every count.

        Each must be an :class:`ElasticMoELayer` (e.g. ``SwiGLUExperts``); any
        object is accepted statically so that ``block.moe.experts`` of a
        union-typed attribute needs no cast, and checked here.

        All layers must agree on their logical, physical and local slot
        counts (``EplbConfigError`` names the first that differs; nothing is
        set then). No layers (a pipeline stage without MoE layers) gives a
        dense model: ``num_moe_layers == 0`` and every count 0.
        """
        shared = _non_negative("num_shared_experts", num_shared_experts)
        groups = _non_negative("num_expert_groups", num_expert_groups)
        found: list[ElasticMoELayer] = []
        for index, layer in enumerate(layers):
            if isinstance(layer, ElasticMoELayer):
                found.append(layer)
            else:
                raise EplbConfigError(
                    f"MoEModelMixin.init_moe_layers: layers[{index}] ({type(layer).__name__}) "
                    "is not an ElasticMoELayer (a MoELayer that tells num_logical_experts, "
                    "num_physical_experts, num_local_physical_experts and implements "
                    "check_/update_physical_experts_metadata), e.g. StackedExperts"
                )
        counts = [
            (
                layer.num_logical_experts,
                layer.num_physical_experts,
                layer.num_local_physical_experts,
            )
            for layer in found
        ]
        for index, layer_counts in enumerate(counts):
            if layer_counts != counts[0]:
                raise EplbConfigError(
                    "MoEModelMixin.init_moe_layers: every MoE layer must have the same "
                    f"(logical, physical, local) slot counts; layers[0] has {counts[0]}, "
                    f"layers[{index}] has {layer_counts}"
                )
        logical, physical, local = counts[0] if counts else (0, 0, 0)
        if found and groups < 1:
            raise EplbConfigError(
                f"MoEModelMixin.init_moe_layers: num_expert_groups must be >= 1, got {groups}"
            )
        if found and logical % groups != 0:
            raise EplbConfigError(
                f"MoEModelMixin.init_moe_layers: {logical} logical experts do not split into "
                f"num_expert_groups={groups} equal groups"
            )
        self._elastic_layers = tuple(found)
        self.expert_weights: MutableSequence[Sequence[Tensor]] = []
        self.moe_layers: Sequence[MoELayer] = self._elastic_layers
        self.num_moe_layers: int = len(found)
        self.num_expert_groups = groups
        self.num_logical_experts = logical
        self.num_routed_experts = logical
        self.num_physical_experts: int = physical
        self.num_local_physical_experts = local
        self.num_redundant_experts: int = physical - logical
        self.num_shared_experts = shared

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        """Adopt new slot counts on every layer and the model, or on none.

        Every layer checks the counts first (``EplbStateError`` when one
        refuses, and nothing changes); the local slot count is fixed by the
        weights.
        """
        for layer in self._elastic_layers:
            layer.check_physical_experts_metadata(
                num_physical_experts=num_physical_experts,
                num_local_physical_experts=num_local_physical_experts,
            )
        if not self._elastic_layers and (num_physical_experts, num_local_physical_experts) != (
            0,
            0,
        ):
            raise EplbStateError(
                "MoEModelMixin: a model without MoE layers has no expert slots to change"
            )
        for layer in self._elastic_layers:
            layer.update_physical_experts_metadata(
                num_physical_experts=num_physical_experts,
                num_local_physical_experts=num_local_physical_experts,
            )
        self.num_physical_experts = num_physical_experts
        self.num_redundant_experts = num_physical_experts - self.num_logical_experts
