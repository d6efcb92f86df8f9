"""Both checkers must accept this file: a MoEView is a MixtureOfExperts, ours and vLLM's.

Checked against stubs/vllm in the main environment and against vLLM 0.33's
own source in the vllm tier (tests/test_typing.py).
"""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence

import torch
from torch import Tensor
from typing_extensions import assert_type
from vllm.config import ModelConfig, ParallelConfig
from vllm.distributed.eplb.eplb_state import EplbState as VllmEplbState
from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
from vllm.model_executor.models.interfaces import MixtureOfExperts as VllmMixtureOfExperts

from moe_protocols import EplbState, MixtureOfExperts, MoELayer, MoEView


def view_is_our_protocol(view: MoEView) -> MixtureOfExperts:
    assert_type(view, MoEView[MoELayer])
    moe: MixtureOfExperts = view
    return moe


def a_vllm_layered_view_is_vllms_protocol(served: object) -> VllmMixtureOfExperts:
    """What a vLLM fork writes in its runner: resolve with vLLM's layer type."""
    view = MoEView.require(served, layer_type=MoERunner)
    assert_type(view, MoEView[MoERunner])
    assert_type(view.moe_layers, Sequence[MoERunner])
    moe_model: VllmMixtureOfExperts = view
    return moe_model


def view_registers_with_vllm_eplb(
    view: MoEView[MoERunner],
    state: VllmEplbState,
    model_config: ModelConfig,
    parallel_config: ParallelConfig,
) -> VllmEplbState:
    state.add_model(view, model_config, model_name="language model")
    return VllmEplbState.from_mapping(
        view,
        model_config,
        torch.device("cpu"),
        parallel_config,
        expanded_physical_to_logical=torch.zeros(1, 8, dtype=torch.long),
    )


def view_registers_with_our_eplb(view: MoEView[MoERunner], state: EplbState) -> None:
    state.add_model(view, model_name="language model")


def view_counts_are_settable_ints(view: MoEView) -> None:
    view.num_physical_experts = view.num_logical_experts + view.num_redundant_experts
    assert_type(view.num_local_physical_experts, int)
    assert_type(view.expert_weights, MutableSequence[Sequence[Tensor]])
    view.expert_weights = []
    view.update_physical_experts_metadata(
        num_physical_experts=view.num_physical_experts,
        num_local_physical_experts=view.num_local_physical_experts,
    )


def resolve_returns_optional(model: object) -> int:
    view = MoEView.resolve(model)
    assert_type(view, MoEView[MoELayer] | None)
    if view is None:
        return 0
    return view.num_moe_layers


def resolve_with_a_layer_type(model: object) -> MoEView[MoERunner] | None:
    view = MoEView.resolve(model, layer_type=MoERunner)
    assert_type(view, MoEView[MoERunner] | None)
    return view
