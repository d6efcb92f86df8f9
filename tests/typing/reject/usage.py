# Misuse of the public API that both checkers must reject; the marker syntax is
# explained at the top of implementations.py and in tests/test_typing.py.
from __future__ import annotations

import torch
from vllm.config import ModelConfig
from vllm.distributed.eplb.eplb_state import EplbState as VllmEplbState
from vllm.model_executor.models.interfaces import MixtureOfExperts as VllmMixtureOfExperts

from moe_protocols import (
    MixtureOfExperts,
    MoEView,
    VerificationReport,
    is_mixture_of_experts,
    verify_eplb_integration,
)


def counts_are_ints(view: MoEView) -> None:
    view.num_physical_experts = "288"  # type: ignore[assignment]  # pyright: ignore[reportAttributeAccessIssue]
    view.num_redundant_experts = 1.5  # type: ignore[assignment]  # pyright: ignore[reportAttributeAccessIssue]
    view.num_physical_expert = 288  # type: ignore[attr-defined]  # pyright: ignore[reportAttributeAccessIssue]


def keywords_are_the_runners(view: MoEView, load: torch.Tensor) -> None:
    view.update_physical_experts_metadata(num_physical=288, num_local_physical_experts=9)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
    view.set_eplb_state(expert_load=load, logical_to_physical_map=load, logical_replica_count=load)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]


def what_the_view_was_built_from_is_fixed(view: MoEView) -> None:
    view.root = object()  # type: ignore[misc]  # pyright: ignore[reportAttributeAccessIssue]


def moe_layers_is_read_only_through_our_protocol(model: MixtureOfExperts) -> None:
    model.moe_layers = []  # type: ignore[misc]  # pyright: ignore[reportAttributeAccessIssue]


def resolve_may_find_nothing(served: object) -> int:
    return MoEView.resolve(served).num_moe_layers  # type: ignore[union-attr]  # pyright: ignore[reportOptionalMemberAccess]


def takes_a_model(model: MixtureOfExperts) -> None: ...


def the_false_branch_is_not_narrowed(model: object) -> None:
    if not is_mixture_of_experts(model):
        takes_a_model(model)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]


def vllm_needs_its_own_layer_type(
    served: object, state: VllmEplbState, model_config: ModelConfig
) -> None:
    # Without layer_type the view's layers are MoELayer; vLLM's moe_layers is
    # Sequence[MoERunner], invariant: the reason layer_type exists.
    moe_model: VllmMixtureOfExperts = MoEView.require(served)  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    state.add_model(MoEView.require(served), model_config)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    print(moe_model)


def layer_type_must_be_a_layer(served: object) -> None:
    MoEView.require(served, layer_type=int)  # type: ignore[type-var]  # pyright: ignore[reportCallIssue, reportArgumentType]


def the_report_is_read_only(report: VerificationReport) -> None:
    report.checks = ()  # type: ignore[misc]  # pyright: ignore[reportAttributeAccessIssue]
    verify_eplb_integration(object(), exact="yes")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    verify_eplb_integration(object(), None, True)  # type: ignore[call-arg, arg-type]  # pyright: ignore[reportCallIssue]
