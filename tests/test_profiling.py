"""Load profiling and placement planning: record_expert_load, plan_placement, ``profile``.

The planner tests run on any installation; those that build transformers
models ask for them through a fixture that needs transformers.
"""

from __future__ import annotations

import argparse
import io
import sys
import types
from typing import TYPE_CHECKING, Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from moe_protocols.cli._exit import EXIT_LOAD_ERROR, EXIT_NOT_MOE, EXIT_OK, EXIT_USAGE
from moe_protocols.cli._profile import add_profile_arguments, run_profile
from moe_protocols.eplb._mapping_io import load_placement, save_placement
from moe_protocols.errors import EplbConfigError, EplbStateError, PolicyError
from moe_protocols.models._tiny_moe import tiny_moe
from moe_protocols.profiling import load_skew, plan_placement, record_expert_load

if TYPE_CHECKING:
    from pathlib import Path

# ---------------------------------------------------------------- helpers


def _rank_balancedness(p2l: Tensor, load: Tensor, num_ranks: int) -> Tensor:
    """Per layer mean/max rank load, each expert's load split over its replicas (by hand)."""
    num_layers, num_physical = p2l.shape
    slots = num_physical // num_ranks
    out = []
    for layer in range(num_layers):
        replicas = torch.bincount(p2l[layer], minlength=load.shape[1]).to(torch.float64)
        per_slot = load[layer].to(torch.float64)[p2l[layer]] / replicas[p2l[layer]]
        ranks = per_slot.view(num_ranks, slots).sum(dim=1)
        out.append(float(ranks.mean() / ranks.max()) if float(ranks.max()) > 0 else 1.0)
    return torch.tensor(out, dtype=torch.float64)


def _ids(batches: int, tokens: int, vocab: int, seed: int = 0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, tokens), generator=generator) for _ in range(batches)]


def _profile(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="moe-protocols profile")
    add_profile_arguments(parser)
    out = io.StringIO()
    err = io.StringIO()
    old_err, sys.stderr = sys.stderr, err
    try:
        code = run_profile(parser.parse_args(argv), out)
    finally:
        sys.stderr = old_err
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------- planning


def test_plan_spreads_hot_experts_that_sit_together() -> None:
    # Experts 0-3 take all the load: the contiguous placement puts them on rank 0.
    load = torch.tensor([[100, 90, 80, 70] + [1] * 12, [5] * 16], dtype=torch.int64)
    plan = plan_placement(load, num_ranks=4)
    p2l = plan.placement.physical_to_logical_map
    hot_ranks = {int(slot) // 4 for slot in torch.isin(p2l[0], torch.arange(4)).nonzero()}
    assert hot_ranks == {0, 1, 2, 3}
    assert torch.allclose(plan.balancedness_per_layer, _rank_balancedness(p2l, load, 4))
    naive = torch.arange(16).repeat(2, 1)
    assert torch.allclose(plan.naive_balancedness_per_layer, _rank_balancedness(naive, load, 4))
    assert plan.balancedness > plan.naive_balancedness
    assert plan.naive_balancedness_per_layer[1] == 1.0


def test_redundant_slots_replicate_the_hottest_expert() -> None:
    load = torch.tensor([[1000] + [10] * 7])
    plan = plan_placement(load, num_ranks=2, num_redundant_experts=2)
    p2l = plan.placement.physical_to_logical_map
    assert p2l.shape == (1, 10)
    assert int((p2l[0] == 0).sum()) == 3
    assert plan.placement.num_physical_experts == 10


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    num_layers=st.integers(1, 3),
    num_experts=st.sampled_from([4, 8, 12]),
    num_ranks=st.sampled_from([1, 2, 4]),
    redundant_per_rank=st.integers(0, 2),
)
def test_plan_is_a_valid_placement_with_honest_figures(
    data: st.DataObject, num_layers: int, num_experts: int, num_ranks: int, redundant_per_rank: int
) -> None:
    redundant = (-num_experts) % num_ranks + redundant_per_rank * num_ranks
    values = data.draw(
        st.lists(
            st.integers(0, 1000),
            min_size=num_layers * num_experts,
            max_size=num_layers * num_experts,
        )
    )
    load = torch.tensor(values, dtype=torch.int64).view(num_layers, num_experts)
    plan = plan_placement(load, num_ranks=num_ranks, num_redundant_experts=redundant)
    p2l = plan.placement.physical_to_logical_map
    assert p2l.shape == (num_layers, num_experts + redundant)
    for layer in range(num_layers):
        assert set(p2l[layer].tolist()) == set(range(num_experts))
    assert torch.allclose(plan.balancedness_per_layer, _rank_balancedness(p2l, load, num_ranks))
    assert all(1 / num_ranks - 1e-9 <= float(b) <= 1 + 1e-9 for b in plan.balancedness_per_layer)
    assert plan.placement.metadata["tokens"] == str(int(load.sum()))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_ranks": 3}, EplbConfigError, "do not split evenly over 3 ranks"),
        ({"num_ranks": 4, "num_nodes": 3}, EplbConfigError, "multiple of num_nodes"),
        ({"num_ranks": 0}, EplbConfigError, "num_ranks"),
        ({"num_ranks": 2, "num_redundant_experts": -1}, EplbConfigError, "num_redundant"),
        ({"num_ranks": 2, "policy": "no-such-policy"}, PolicyError, "no-such-policy"),
    ],
)
def test_plan_rejects_an_impossible_deployment(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        plan_placement(torch.ones(2, 8), **kwargs)


def test_plan_is_saved_in_the_mapping_format(tmp_path: Path) -> None:
    plan = plan_placement(torch.arange(16.0).view(2, 8), num_ranks=2, num_redundant_experts=2)
    for name in ("plan.json", "plan.safetensors"):
        path = tmp_path / name
        save_placement(plan.placement, path)
        assert load_placement(path) == plan.placement


def test_plan_table_has_a_row_per_layer() -> None:
    load = torch.tensor([[9, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    plan = plan_placement(load, num_ranks=2)
    lines = str(plan).splitlines()
    # A header, a row per layer, the total, then a legend of the columns.
    assert [line.split()[0] for line in lines[1:6]] == ["layer", "0", "1", "2", "all"]
    assert [line.split(":")[0] for line in lines[6:]] == ["load", "skew", "hottest", "bal"]
    assert load_skew(load).tolist() == [3.0, 1.0, 1.0]


# ---------------------------------------------------------------- recording


def test_recording_a_native_model_sums_replicas_per_logical_expert() -> None:
    model = tiny_moe(num_redundant_experts=4)
    batches = _ids(3, 10, model.config.vocab_size)
    load = record_expert_load(model, batches)
    assert load.shape == (model.num_moe_layers, model.num_logical_experts)
    assert load.sum(dim=1).tolist() == [3 * 10 * model.config.top_k] * model.num_moe_layers


@pytest.fixture(scope="module")
def hf_models() -> types.ModuleType:
    pytest.importorskip("transformers")
    import hf_models

    return hf_models


def _hook_dicts(model: nn.Module) -> list[int]:
    return [
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._forward_pre_hooks_with_kwargs)
        for m in model.modules()
    ]


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen3_vl_moe", "llama4_vlm"])
def test_recording_hf_models_counts_tokens_times_top_k(
    hf_models: types.ModuleType, name: str
) -> None:
    family = next(f for f in hf_models.FAMILIES if f.name == name)
    model = family.build()
    before = _hook_dicts(model)
    batches = _ids(2, 12, hf_models.VOCAB)
    load = record_expert_load(model, batches, forward=lambda m, ids: family.run(m, ids))
    assert load.shape == (family.num_moe_layers, family.num_experts)
    assert load.sum(dim=1).tolist() == [2 * 12 * family.top_k] * family.num_moe_layers
    assert _hook_dicts(model) == before


def test_recording_refuses_a_model_whose_hook_never_fired(hf_models: types.ModuleType) -> None:
    model = hf_models.qwen3_moe()
    block = model.model.layers[0].mlp
    block.forward = types.MethodType(lambda self, hidden: torch.zeros_like(hidden), block)
    before = _hook_dicts(model)
    with pytest.raises(EplbStateError, match="never fired"):
        record_expert_load(model, _ids(1, 8, hf_models.VOCAB))
    assert _hook_dicts(model) == before


def test_profile_default_model_prints_and_saves_a_plan(
    hf_models: types.ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "placement.json"
    code, out, err = _profile(["--tokens", "32", "--batches", "2", "--save", str(path)])
    assert code == EXIT_OK, err
    assert "model -> hf-experts adapter" in out
    assert "balancedness: naive" in out
    placement = load_placement(path)
    assert placement.num_ranks == 4
    assert placement.num_logical_experts == 16
    assert placement.metadata["model"] == "Qwen3MoeForCausalLM"
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == placement.num_layers


def test_profile_runs_any_factory_through_its_wrapper(hf_models: types.ModuleType) -> None:
    code, out, err = _profile(
        ["hf_models:qwen3_vl_moe", "--ranks", "2", "--redundant", "2", "--tokens", "16"]
    )
    assert code == EXIT_OK, err
    assert "model.model.language_model -> hf-experts adapter" in out
    assert "(8 experts + 2 redundant)" in out


def test_profile_native_model_needs_no_transformers() -> None:
    code, out, err = _profile(
        ["moe_protocols.models._tiny_moe:tiny_moe", "--ranks", "2", "--tokens", "16"]
    )
    assert code == EXIT_OK, err
    assert "TinyMoEForCausalLM" in out


def test_profile_without_transformers_exits_3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    code, _, err = _profile([])
    assert code == EXIT_LOAD_ERROR
    assert "moe-protocols[hf]" in err


def test_profile_rejects_ranks_that_do_not_divide_the_slots() -> None:
    code, _, err = _profile(["moe_protocols.models._tiny_moe:tiny_moe", "--ranks", "3"])
    assert code == EXIT_USAGE
    assert "--ranks 3" in err


def test_profile_of_a_dense_model_exits_1() -> None:
    code, out, _ = _profile(["torch.nn:Identity"])
    assert code == EXIT_NOT_MOE
    assert "Identity" in out


def test_profile_of_a_missing_factory_exits_3() -> None:
    code, _, err = _profile(["no_such_module_here:build"])
    assert code == EXIT_LOAD_ERROR
    assert "no_such_module_here" in err


def test_recording_refuses_input_ids_without_a_batch_dimension() -> None:
    from moe_protocols.errors import ModelInputError

    model = tiny_moe()
    ids = torch.randint(0, model.config.vocab_size, (10,))
    with pytest.raises(ModelInputError, match=r"batch 0: .*shape \(10,\).*unsqueeze\(0\)"):
        record_expert_load(model, [ids])
    # the layers were handed back: a second, valid recording works and counts every token
    load = record_expert_load(model, [ids.unsqueeze(0)])
    assert int(load.sum()) == 10 * model.config.top_k * model.num_moe_layers
