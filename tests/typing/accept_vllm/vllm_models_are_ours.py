"""Both checkers must accept this file against vLLM 0.33's own source (the vllm tier only:
stubs/vllm has no model classes): vLLM's models and protocol are our MixtureOfExperts."""

from __future__ import annotations

from collections.abc import Sequence

from typing_extensions import assert_type
from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
from vllm.model_executor.models.interfaces import MixtureOfExperts as VllmMixtureOfExperts
from vllm.model_executor.models.interfaces import get_mixture_of_experts_model
from vllm.model_executor.models.mixtral import MixtralForCausalLM

from moe_protocols import EplbState, MixtureOfExperts, MoELayer, MoEView


def mixtral_is_ours(model: MixtralForCausalLM) -> MixtureOfExperts:
    ours: MixtureOfExperts = model
    with_vllm_layers: MixtureOfExperts[MoERunner] = model
    assert_type(with_vllm_layers.moe_layers, Sequence[MoERunner])
    return ours


def vllms_protocol_is_ours(model: VllmMixtureOfExperts) -> MixtureOfExperts[MoERunner]:
    return model


def layers_of(model: MixtureOfExperts) -> Sequence[MoELayer]:
    assert_type(model.moe_layers, Sequence[MoELayer])
    return model.moe_layers


def vllms_model_reads_as_ours(model: VllmMixtureOfExperts) -> int:
    return len(layers_of(model))


def vllms_unwrap_result_registers_with_our_eplb(served: object, state: EplbState) -> None:
    moe = get_mixture_of_experts_model(served)
    if moe is not None:
        state.add_model(moe)


def a_view_over_mixtral_keeps_vllms_layer_type(model: MixtralForCausalLM) -> None:
    view = MoEView.require(model, layer_type=MoERunner)
    assert_type(view, MoEView[MoERunner])
    moe_model: VllmMixtureOfExperts = view
    assert_type(moe_model.moe_layers, Sequence[MoERunner])
