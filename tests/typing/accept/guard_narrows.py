"""Both checkers must accept this file: the guards narrow the True branch only (TypeGuard).

They are False for some objects that are of the protocol type (no MoE layers,
a broken invariant, a renamed parameter mypy accepts), so the False branch
keeps the type it had: pinned here with assert_type on both branches.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from typing_extensions import assert_type

from moe_protocols import (
    MixtureOfExperts,
    MoELayer,
    SupportsLanguageModel,
    is_mixture_of_experts,
    is_moe_layer,
    supports_language_model,
)


def physical_slots(model: object) -> int:
    if is_mixture_of_experts(model):
        assert_type(model, MixtureOfExperts)
        return model.num_physical_experts
    assert_type(model, object)
    return 0


def a_dense_stage_is_still_typed_as_moe(model: MixtureOfExperts) -> MixtureOfExperts:
    if not is_mixture_of_experts(model):
        # num_moe_layers == 0 (a pipeline stage without MoE layers): not
        # narrowed away, the branch is reachable and the model keeps its type.
        assert_type(model, MixtureOfExperts)
    return model


def layer_weights(model: object) -> Sequence[Sequence[Tensor]]:
    if not is_mixture_of_experts(model):
        return []
    return model.expert_weights


def first_layer(candidate: object) -> MoELayer | None:
    if is_moe_layer(candidate):
        assert_type(candidate, MoELayer)
        return candidate
    assert_type(candidate, object)
    return None


def language_model_of(wrapper: object) -> object:
    if supports_language_model(wrapper):
        assert_type(wrapper, SupportsLanguageModel)
        return wrapper.get_language_model()
    assert_type(wrapper, object)
    return wrapper
