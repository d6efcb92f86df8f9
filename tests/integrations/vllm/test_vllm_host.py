"""Against the real vLLM 0.33 (the `vllm` tier, scripts/setup-vllm.sh): vLLM's own
guard, unwrap helper and protocol accept what this library builds.

These run with .venv-vllm's interpreter (scripts/check.sh). Without vLLM they
skip locally and fail when MOE_PROTOCOLS_REQUIRE_VLLM=1, as in CI.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING

import pytest
import torch

from moe_protocols import MoEView, NotMixtureOfExpertsError, is_mixture_of_experts

if TYPE_CHECKING:
    from fakes import FakeMoELM

    from moe_protocols.models import TinyMoEForCausalLM, TinyVLMForConditionalGeneration

pytestmark = pytest.mark.vllm


def test_the_tier_has_the_vllm_release_we_claim() -> None:
    assert importlib.metadata.version("vllm") == "0.33.0"


def test_vllms_guard_accepts_a_view_of_a_wrapped_model(
    skewed_vlm: TinyVLMForConditionalGeneration,
) -> None:
    from vllm.model_executor.models import interfaces

    assert interfaces.get_mixture_of_experts_model(skewed_vlm) is None  # one level only
    # Typed object: statically a MoEView[MoELayer] is not vLLM's protocol (see
    # layer_type); at run time vLLM's structural check accepts it.
    view: object = MoEView.require(skewed_vlm)
    assert interfaces.is_mixture_of_experts(view)
    assert isinstance(view, interfaces.MixtureOfExperts)
    assert interfaces.get_mixture_of_experts_model(view) is view


def test_vllms_guard_and_ours_agree_on_native_and_dense_models(
    skewed_lm: TinyMoEForCausalLM, fake_lm: FakeMoELM, fake_dense_lm: FakeMoELM
) -> None:
    from vllm.model_executor.models import interfaces

    for model, expected in ((skewed_lm, True), (fake_lm, True), (fake_dense_lm, False)):
        assert interfaces.is_mixture_of_experts(model) is expected
        assert is_mixture_of_experts(model) is expected


def test_vllms_default_set_eplb_state_fills_the_view_and_reaches_every_layer(
    skewed_vlm: TinyVLMForConditionalGeneration,
) -> None:
    """vLLM's protocol body (the default a subclass inherits), run on our view."""
    from vllm.model_executor.models.interfaces import MixtureOfExperts as VllmMixtureOfExperts

    view = MoEView.require(skewed_vlm)
    layers, physical = view.num_moe_layers, view.num_physical_experts
    load = torch.zeros(layers, physical, dtype=torch.int32)
    l2p = torch.full((layers, view.num_logical_experts, 4), -1, dtype=torch.long)
    counts = torch.ones(layers, view.num_logical_experts, dtype=torch.long)
    VllmMixtureOfExperts.set_eplb_state(
        view,  # type: ignore[arg-type]  # reason: calls the protocol's body unbound
        expert_load_view=load,
        logical_to_physical_map=l2p,
        logical_replica_count=counts,
    )
    assert len(view.model.expert_weights) == layers
    assert view.expert_weights is view.model.expert_weights
    for weights, layer in zip(view.expert_weights, view.moe_layers, strict=True):
        assert [w.data_ptr() for w in weights] == [w.data_ptr() for w in layer.get_expert_weights()]


def test_asking_for_vllms_layer_type_names_a_layer_that_is_not_one(
    skewed_vlm: TinyVLMForConditionalGeneration,
) -> None:
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    assert MoEView.resolve(skewed_vlm, layer_type=MoERunner) is None
    with pytest.raises(
        NotMixtureOfExpertsError, match=r"moe_layers\[0\] is a TinyMoEBlock instance"
    ):
        MoEView.require(skewed_vlm, layer_type=MoERunner)
