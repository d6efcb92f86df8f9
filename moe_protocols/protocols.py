"""The contract: structural protocols a serving runner and EPLB consume.

Member for member call-compatible with vLLM 0.33's ``MixtureOfExperts``: the
same names, types and parameter names, because runners call these methods by
keyword. One difference, on purpose: ``MixtureOfExperts`` is generic in its
layer type and ``moe_layers`` is read-only here (a host only iterates it), so
that vLLM's models, whose ``moe_layers`` is ``Sequence[MoERunner]`` (a
concrete class), are a ``MixtureOfExperts`` of ours, and a ``MoEView`` over
one is ``MixtureOfExperts[MoERunner]``, which is vLLM's protocol too. Shapes
use L = MoE layers, E = logical experts, P = physical expert slots.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, MutableSequence, Sequence
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

import torch
from torch import Tensor
from typing_extensions import TypeVar

__all__ = [
    "COUNT_MEMBERS",
    "LAYER_METHODS",
    "LayerT_co",
    "MODEL_MEMBERS",
    "MODEL_METHODS",
    "MixtureOfExperts",
    "MoELayer",
    "SupportsLanguageModel",
]


@runtime_checkable
class MoELayer(Protocol):
    """One MoE layer as EPLB sees it: its expert weights and its EPLB views."""

    def get_expert_weights(self) -> Iterable[Tensor]:
        """Return this layer's routed-expert weight tensors on this rank.

        Each tensor has dim 0 = local physical expert slot (``[local_physical, ...]``)
        and is a view of the live parameter, so writing into it moves the expert.
        """
        ...

    def set_eplb_state(
        self,
        moe_layer_idx: int,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        """Keep row ``moe_layer_idx`` of each model-wide EPLB tensor.

        ``expert_load_view`` is ``[L, P]`` (the layer adds one per token-expert
        assignment to its row), ``logical_to_physical_map`` is
        ``[L, E, max_replicas]`` (-1 padded) and ``logical_replica_count`` is
        ``[L, E]``. They are views of live EPLB state, updated in place.
        """
        ...


LayerT_co = TypeVar("LayerT_co", bound=MoELayer, covariant=True, default=MoELayer)
"""The layer type of a ``MixtureOfExperts`` (``MoELayer`` when not given)."""


@runtime_checkable
class MixtureOfExperts(Protocol[LayerT_co]):
    """A model with MoE layers whose experts EPLB may replicate and move.

    ``MixtureOfExperts`` alone means ``MixtureOfExperts[MoELayer]``: any layer
    objects with the two ``MoELayer`` methods. ``MixtureOfExperts[MoERunner]``
    says the layers are vLLM's, which vLLM's own protocol requires. The data
    members are plain settable attributes, as in vLLM (elastic EP rewrites
    the counts, ``set_eplb_state`` rewrites ``expert_weights``); only
    ``moe_layers`` is read-only, which is what lets the layer type vary.
    """

    expert_weights: MutableSequence[Sequence[Tensor]]
    """Expert weights on this rank: ``expert_weights[layer][k]`` is the k-th weight
    tensor of MoE layer ``layer``, ``[local_physical, ...]``. Filled by ``set_eplb_state``."""

    num_moe_layers: int
    """Number of MoE layers in this model (on this pipeline stage)."""

    num_expert_groups: int
    """Number of expert groups for group-limited routing (1 for most models)."""

    num_logical_experts: int
    """Experts the router chooses among."""

    num_physical_experts: int
    """Expert slots over all EP ranks: logical plus redundant."""

    num_local_physical_experts: int
    """Expert slots held on this rank."""

    num_routed_experts: int
    """Routed experts (equal to the logical experts)."""

    num_shared_experts: int
    """Shared (always-on) experts; EPLB does not move them."""

    num_redundant_experts: int
    """Extra physical slots holding replicas of hot experts."""

    if TYPE_CHECKING:

        @property
        def moe_layers(self) -> Sequence[LayerT_co]:
            """The MoE layer objects, one per MoE layer, in layer order.

            Read-only for type checkers (so the layer type is covariant); an
            implementing class declares it as an attribute,
            ``self.moe_layers: Sequence[MyLayer] = ...``.
            """
            ...

    else:
        # At run time a plain annotation: still a member for isinstance(), and
        # a subclass of the protocol can assign it (a property here would
        # shadow the subclass's instance attribute).
        moe_layers: Sequence[MoELayer]

    def set_eplb_state(
        self,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        """Register live EPLB state: views that EPLB updates in place later.

        The default (for classes that subclass this protocol) collects
        ``expert_weights`` afresh from ``moe_layers`` (weights are collected here,
        not at load, because post-load processing may replace them) and hands
        each layer its row. One-byte dtypes are re-viewed as ``uint8`` since
        transfer backends move bytes and lack the exotic 8-bit types.
        """
        self.expert_weights = []
        for layer_idx, layer in enumerate(self.moe_layers):
            self.expert_weights.append(
                [
                    w.view(torch.uint8) if w.element_size() == 1 else w
                    for w in layer.get_expert_weights()
                ]
            )
            layer.set_eplb_state(
                moe_layer_idx=layer_idx,
                expert_load_view=expert_load_view,
                logical_to_physical_map=logical_to_physical_map,
                logical_replica_count=logical_replica_count,
            )

    def update_physical_experts_metadata(
        self,
        num_physical_experts: int,
        num_local_physical_experts: int,
    ) -> None:
        """Adopt new physical slot counts after an elastic scale-up or -down."""
        ...


@runtime_checkable
class SupportsLanguageModel(Protocol):
    """A multimodal wrapper that can hand out its language model."""

    def get_language_model(self) -> object:
        """Return the wrapped language model; may raise ``NotImplementedError``."""
        ...


# The member lists below are read off the protocol classes above, so the
# contract is written once: adding a member to a protocol adds it to every
# check that walks these lists (conformance, the walk, the state, the plugin).


def _methods(protocol: type) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Each method a protocol declares, with its keyword parameter names (``self`` dropped)."""
    found: list[tuple[str, tuple[str, ...]]] = []
    for name, value in vars(protocol).items():
        if name.startswith("_") or not inspect.isfunction(value):
            continue
        parameters = tuple(inspect.signature(value).parameters)[1:]
        found.append((name, parameters))
    return tuple(found)


def _data_members(protocol: type) -> tuple[str, ...]:
    """The data members a protocol annotates, in declaration order."""
    annotations: dict[str, object] = vars(protocol).get("__annotations__", {})
    return tuple(annotations)


_MODEL_DATA: Final = _data_members(MixtureOfExperts)

COUNT_MEMBERS: Final[tuple[str, ...]] = tuple(
    name for name in _MODEL_DATA if vars(MixtureOfExperts)["__annotations__"][name] == "int"
)
"""The ``MixtureOfExperts`` ``int`` data members, in protocol order."""

MODEL_METHODS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = _methods(MixtureOfExperts)
"""Each ``MixtureOfExperts`` method with the keyword names a runner passes to it."""

LAYER_METHODS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = _methods(MoELayer)
"""Each ``MoELayer`` method with the keyword names EPLB passes to it."""

MODEL_MEMBERS: Final[tuple[str, ...]] = (
    *_MODEL_DATA,
    *(name for name, _ in MODEL_METHODS),
)
"""Every ``MixtureOfExperts`` member, in protocol order (data members, then methods)."""
