"""mypy must accept this file: the guards narrow with TypeIs, no casts needed."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from moe_protocols import MoELayer, is_mixture_of_experts, is_moe_layer


def physical_slots(model: object) -> int:
    if is_mixture_of_experts(model):
        return model.num_physical_experts
    return 0


def layer_weights(model: object) -> Sequence[Sequence[Tensor]]:
    if not is_mixture_of_experts(model):
        return []
    return model.expert_weights


def first_layer(candidate: object) -> MoELayer | None:
    return candidate if is_moe_layer(candidate) else None
