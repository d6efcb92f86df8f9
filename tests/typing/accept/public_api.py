"""Both checkers must accept this file: the types of the public API a fork calls."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from typing_extensions import assert_type

from moe_protocols import (
    ConformanceReport,
    EplbState,
    MixtureOfExperts,
    MoELayer,
    MoEView,
    NotMixtureOfExpertsError,
    ResolutionTrace,
    check_conformance,
    check_layer_conformance,
)
from moe_protocols.adapters import HFMoEAdapter
from moe_protocols.models import (
    TinyMoEForCausalLM,
    TinyProxyVLMForConditionalGeneration,
    tiny_moe,
    tiny_vlm,
)


def resolution(served: object) -> MixtureOfExperts:
    view = MoEView.require(served)
    assert_type(view, MoEView[MoELayer])
    assert_type(view.root, object)
    assert_type(view.model, MixtureOfExperts[MoELayer])
    assert_type(view.trace, ResolutionTrace)
    assert_type(view.trace.resolved_path, str | None)
    assert_type(MoEView.resolve(served, max_depth=2), MoEView[MoELayer] | None)
    return view


def a_reference_model_is_a_mixture_of_experts() -> MixtureOfExperts:
    model = tiny_moe(num_experts=8)
    assert_type(model, TinyMoEForCausalLM)
    view = MoEView.require(tiny_vlm())
    assert_type(view.moe_layers[0], MoELayer)
    return model


def adapters_and_forwarding_wrappers_are_ours(
    hf: HFMoEAdapter, proxy: TinyProxyVLMForConditionalGeneration
) -> list[MixtureOfExperts]:
    # Attributes, not properties, to both checkers: pyright accepts no property
    # for a protocol attribute.
    assert_type(hf.num_physical_experts, int)
    assert_type(proxy.moe_layers, Sequence[MoELayer])
    return [hf, proxy, MoEView.require(proxy)]


def the_error_carries_the_story(served: object) -> ResolutionTrace | None:
    try:
        MoEView.require(served)
    except NotMixtureOfExpertsError as error:
        assert_type(error.reports, tuple[ConformanceReport, ...])
        return error.trace
    return None


def conformance(served: object) -> bool:
    report = check_conformance(served)
    assert_type(report, ConformanceReport)
    assert_type(report.is_moe, bool)
    assert_type(report.num_moe_layers, int | None)
    assert_type(check_layer_conformance(served, path="layer").ok, bool)
    return report.ok


def register(view: MoEView, state: EplbState) -> None:
    load = torch.zeros(view.num_moe_layers, view.num_physical_experts, dtype=torch.int32)
    view.set_eplb_state(
        expert_load_view=load,
        logical_to_physical_map=torch.zeros(1),
        logical_replica_count=torch.zeros(1),
    )
    state.add_model(view)
