"""The TypeIs guards: structural, strict about MoE layers, and never raising."""

from __future__ import annotations

import pytest
from fakes import (
    HOSTILE,
    FakeMoELayer,
    FakeMoELM,
    Gemma4LikeVLM,
    Hostile,
    NotImplementedVLM,
    OneLevelVLM,
    PositionalLayer,
    ProxyWrapper,
    raising_property,
)

from moe_protocols.guards import is_mixture_of_experts, is_moe_layer, supports_language_model
from moe_protocols.models import tiny_moe, tiny_proxy_vlm, tiny_vlm


def test_native_and_proxy_models_are_mixture_of_experts(fake_lm: FakeMoELM) -> None:
    wrapper = ProxyWrapper(fake_lm)  # before the guard narrows fake_lm to the protocol
    assert is_mixture_of_experts(fake_lm)
    assert is_mixture_of_experts(wrapper)
    assert is_mixture_of_experts(tiny_moe())
    assert is_mixture_of_experts(tiny_proxy_vlm())


def test_dense_model_is_not_mixture_of_experts(fake_dense_lm: FakeMoELM) -> None:
    assert not is_mixture_of_experts(fake_dense_lm)


def test_wrappers_that_only_hold_the_model_are_not_mixture_of_experts(
    fake_lm: FakeMoELM,
) -> None:
    assert not is_mixture_of_experts(OneLevelVLM(fake_lm))
    assert not is_mixture_of_experts(tiny_vlm())
    # Copies every count and moe_layers, but lacks expert_weights and set_eplb_state.
    assert not is_mixture_of_experts(Gemma4LikeVLM(fake_lm))


@pytest.mark.parametrize("case", HOSTILE, ids=lambda case: case.name)
def test_is_mixture_of_experts_is_false_and_silent_on_hostile_input(case: Hostile) -> None:
    assert is_mixture_of_experts(case.build()) is False


@pytest.mark.parametrize("case", HOSTILE, ids=lambda case: case.name)
def test_is_moe_layer_never_raises_on_hostile_input(case: Hostile) -> None:
    # A mock has every method, callable with any arguments: structurally it IS a layer.
    # (It still is not a MixtureOfExperts: its counts are not ints.)
    assert is_moe_layer(case.build()) is ("MagicMock" in case.name)


def test_is_moe_layer_accepts_conforming_layers_only() -> None:
    assert is_moe_layer(FakeMoELayer(4))
    assert all(is_moe_layer(layer) for layer in tiny_moe().moe_layers)
    assert not is_moe_layer(FakeMoELayer)  # the class, not an instance
    assert not is_moe_layer(PositionalLayer(4))  # renames moe_layer_idx
    assert not is_moe_layer(object())


def test_supports_language_model_is_structural(fake_lm: FakeMoELM) -> None:
    assert supports_language_model(OneLevelVLM(fake_lm))
    # Having the method is the capability; calling it may still raise NotImplementedError.
    assert supports_language_model(NotImplementedVLM(fake_lm))
    assert supports_language_model(tiny_vlm())
    assert not supports_language_model(fake_lm)
    assert not supports_language_model(OneLevelVLM)  # the class, not an instance
    assert not supports_language_model(None)


def test_supports_language_model_is_false_when_reading_the_method_raises() -> None:
    class Broken:
        @property
        def get_language_model(self) -> object:
            raise RuntimeError("not ready")

    assert not supports_language_model(Broken())


def test_guards_do_not_raise_when_a_property_raises() -> None:
    # Typed as object: a False TypeIs guard would otherwise narrow FakeMoELM away.
    model: object = raising_property(RuntimeError)
    assert not is_mixture_of_experts(model)
    assert not is_moe_layer(model)
    assert not supports_language_model(model)
