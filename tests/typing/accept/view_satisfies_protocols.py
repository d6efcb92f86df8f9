"""mypy must accept this file: a MoEView is a MixtureOfExperts, ours and vLLM's."""

from __future__ import annotations

from vllm.config import ModelConfig
from vllm.distributed.eplb.eplb_state import EplbState as VllmEplbState
from vllm.model_executor.models.interfaces import MixtureOfExperts as VllmMixtureOfExperts

from moe_protocols import MixtureOfExperts, MoEView


def view_is_our_protocol(view: MoEView) -> MixtureOfExperts:
    moe: MixtureOfExperts = view
    return moe


def view_is_vllm_protocol(view: MoEView) -> VllmMixtureOfExperts:
    moe: VllmMixtureOfExperts = view
    return moe


def view_registers_with_vllm_eplb(
    view: MoEView, state: VllmEplbState, model_config: ModelConfig
) -> None:
    state.add_model(view, model_config, model_name="language model")


def view_counts_are_settable_ints(view: MoEView) -> None:
    view.num_physical_experts = view.num_logical_experts + view.num_redundant_experts
    view.update_physical_experts_metadata(
        num_physical_experts=view.num_physical_experts,
        num_local_physical_experts=view.num_local_physical_experts,
    )


def resolve_returns_optional(model: object) -> int:
    view = MoEView.resolve(model)
    if view is None:
        return 0
    return view.num_moe_layers
