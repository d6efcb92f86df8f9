"""The seed regression: a runner handed a wrapped MoE model must register EPLB at load time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_protocols import (
    EplbConfig,
    EplbStateError,
    NotMixtureOfExpertsError,
    ReferenceRunner,
    RunnerConfig,
    is_mixture_of_experts,
    load_placement,
)
from moe_protocols.models import (
    TinyMoEForCausalLM,
    TinyVLMForConditionalGeneration,
    tiny_moe,
    tiny_vlm,
)


def _runner(enable: bool = True, **eplb: int) -> ReferenceRunner:
    config = EplbConfig(
        window_size=eplb.get("window_size", 4),
        step_interval=eplb.get("step_interval", 5),
        num_redundant_experts=4,
    )
    return ReferenceRunner(RunnerConfig(enable_eplb=enable, eplb=config, num_ranks=4))


def _skewed_batches(n: int, seed: int = 0, vocab: int = 128) -> list[torch.Tensor]:
    """Zipf-distributed token ids: a few tokens, hence a few experts, are hot."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-1.2)
    probs = probs[torch.randperm(vocab, generator=gen)]
    return [
        torch.multinomial(probs, 8 * 64, replacement=True, generator=gen).view(8, 64)
        for _ in range(n)
    ]


def _language_model(model: object) -> TinyMoEForCausalLM:
    get = getattr(model, "get_language_model", None)
    inner = get() if callable(get) else model
    assert isinstance(inner, TinyMoEForCausalLM)
    return inner


@pytest.mark.parametrize("wrapped", [True, False], ids=["vlm-wrapped", "native"])
def test_moe_model_registers_at_load_time(wrapped: bool) -> None:
    model = (
        tiny_vlm(num_experts=16, num_redundant_experts=4)
        if wrapped
        else tiny_moe(num_experts=16, num_redundant_experts=4)
    )
    assert is_mixture_of_experts(model) is not wrapped  # the wrapper itself is not MoE
    runner = _runner()
    runner.load_model(model)
    assert runner.eplb_state is not None
    assert runner.eplb_state.model_names == ("model",)
    assert runner.moe_view is not None
    assert runner.moe_view.model is _language_model(model)
    # The layers hold views of the live EPLB tensors from load time on.
    assert len(_language_model(model).expert_weights) == 3


@pytest.mark.parametrize("wrapped", [True, False], ids=["vlm-wrapped", "native"])
def test_forwards_record_load_and_rearrange_at_the_interval(wrapped: bool) -> None:
    model = (
        tiny_vlm(num_experts=16, num_redundant_experts=4)
        if wrapped
        else tiny_moe(num_experts=16, num_redundant_experts=4)
    )
    runner = _runner(step_interval=5)
    runner.load_model(model)
    state = runner.eplb_state
    assert state is not None
    batches = _skewed_batches(10)
    runner.execute_model(batches[0])  # the first forward raises nothing
    # One count per token and chosen expert (top-2), in each of the 3 MoE layers.
    assert int(state.expert_load_window("model").sum()) == batches[0].numel() * 2 * 3
    for step, batch in enumerate(batches[1:], start=2):
        runner.execute_model(batch)
        assert state.num_rearrangements == step // 5
    result = state.last_rearrangement
    assert result is not None
    assert result["model"].slots_changed > 0


def test_rearrangement_improves_measured_balancedness_on_a_skewed_stream(
    skewed_vlm: TinyVLMForConditionalGeneration,
) -> None:
    runner = _runner(window_size=5, step_interval=5)
    runner.load_model(skewed_vlm)
    state = runner.eplb_state
    assert state is not None
    batches = _skewed_batches(9, seed=1)
    for batch in batches[:4]:
        runner.execute_model(batch)
    before = state.balancedness("model").overall  # initial placement, 4 windows of load
    runner.execute_model(batches[4])  # the 5th step rearranges
    assert state.num_rearrangements == 1
    for batch in batches[5:]:
        runner.execute_model(batch)
    after = state.balancedness("model").overall  # the same stream, new placement
    assert before < 0.8
    assert after > before + 0.1


def test_dense_model_with_eplb_fails_at_load_time_with_the_trace() -> None:
    runner = _runner()
    dense = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(NotMixtureOfExpertsError) as info:
        runner.load_model(dense)
    message = str(info.value)
    assert "Sequential" in message
    assert "get_language_model()" in message
    assert info.value.trace is not None
    with pytest.raises(EplbStateError, match="load_model"):
        runner.execute_model(torch.zeros(1, 4))
    assert runner.eplb_state is None


def test_eplb_disabled_changes_nothing(skewed_vlm: TinyVLMForConditionalGeneration) -> None:
    reference = tiny_vlm(num_experts=16, num_redundant_experts=4)
    runner = _runner(enable=False)
    runner.load_model(skewed_vlm)
    assert runner.eplb_state is None
    assert runner.moe_view is not None  # resolved anyway, for the elastic path
    assert _language_model(skewed_vlm).expert_weights == []  # no EPLB state was handed over
    for batch in _skewed_batches(3):
        with torch.no_grad():
            expected = reference(batch)
        assert torch.equal(runner.execute_model(batch), expected)


def test_outputs_are_bit_identical_across_rearrangements(
    skewed_vlm: TinyVLMForConditionalGeneration,
) -> None:
    runner = _runner(step_interval=3)
    runner.load_model(skewed_vlm)
    state = runner.eplb_state
    assert state is not None
    probe = _skewed_batches(1, seed=7)[0]
    with torch.no_grad():
        before = skewed_vlm(probe)
    for batch in _skewed_batches(6, seed=2):
        runner.execute_model(batch)
    assert state.num_rearrangements == 2
    result = state.last_rearrangement
    assert result is not None
    assert result["model"].slots_changed > 0
    with torch.no_grad():
        after = skewed_vlm(probe)
    assert torch.equal(before, after)


def test_saved_placement_restores_through_the_runner(tmp_path: Path) -> None:
    source = _runner(step_interval=3)
    source_model = tiny_vlm(num_experts=16, num_redundant_experts=4)
    source.load_model(source_model)
    assert source.eplb_state is not None
    for batch in _skewed_batches(3, seed=3):
        source.execute_model(batch)
    path = tmp_path / "placement.json"
    source.eplb_state.save_placement(path)

    target_model = tiny_vlm(num_experts=16, num_redundant_experts=4)
    target = _runner(step_interval=100)
    target.load_model(target_model)
    target.setup_eplb_from_mapping(load_placement(path))
    assert target.eplb_state is not None
    assert torch.equal(
        target.eplb_state.physical_to_logical_map("model"),
        source.eplb_state.physical_to_logical_map("model"),
    )
    probe = _skewed_batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(target_model(probe), source_model(probe))


def test_elastic_metadata_update_reaches_the_wrapped_model(
    skewed_vlm: TinyVLMForConditionalGeneration,
) -> None:
    runner = _runner()
    runner.load_model(skewed_vlm)
    lm = _language_model(skewed_vlm)
    runner.update_physical_experts_metadata(
        num_physical_experts=40, num_local_physical_experts=lm.num_local_physical_experts
    )
    assert lm.num_physical_experts == 40  # scaled up to 2 ranks of 20 slots
    assert lm.num_redundant_experts == 24
    assert not hasattr(skewed_vlm, "num_physical_experts")  # nothing landed on the wrapper
