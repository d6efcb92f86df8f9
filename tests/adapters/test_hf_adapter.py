"""The hf-experts adapter over tiny random-config transformers MoE models (no hub access).

For every family: ``MoEView`` resolves it (through the wrapper for VLMs),
the recorded counts are the router's real choices, the exposed weights are
views that reproduce each expert, outputs do not change with the hooks in,
and removing the hooks leaves nothing behind.
"""

from __future__ import annotations

import ast
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from unittest.mock import MagicMock

import pytest

pytest.importorskip("transformers")

import torch
from hf_models import FAMILIES, HIDDEN, OTHER_STANDARD_FAMILIES, VOCAB, Family
from torch import Tensor, nn

from moe_protocols import profiling as profiling_module
from moe_protocols.adapters import DEFAULT_UNWRAP_STEPS, MoEView, UnwrapStep
from moe_protocols.adapters import hf as hf_package
from moe_protocols.adapters._step import attribute_probe
from moe_protocols.adapters.hf import (
    HF_EXPERTS_STEP,
    HF_GET_DECODER_STEP,
    INDEX_HOOK,
    SCORES_HOOK,
    HFMoEAdapter,
    HFMoELayer,
    discover_hf_moe,
)
from moe_protocols.conformance import check_conformance
from moe_protocols.eplb import EplbConfig, EplbState
from moe_protocols.errors import EplbStateError, MappingError, NotMixtureOfExpertsError
from moe_protocols.guards import is_mixture_of_experts

STEPS = (*DEFAULT_UNWRAP_STEPS, HF_GET_DECODER_STEP, HF_EXPERTS_STEP)
BATCH, SEQ = 2, 8
TOKENS = BATCH * SEQ


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def family(request: pytest.FixtureRequest) -> tuple[Family, nn.Module]:
    spec: Family = request.param
    return spec, spec.build()


def _ids(seed: int = 0) -> Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _adapter(model: nn.Module) -> HFMoEAdapter:
    view = MoEView.require(model, steps=STEPS)
    adapter = view.model
    assert isinstance(adapter, HFMoEAdapter)
    return adapter


def _identity_maps(num_layers: int, num_experts: int) -> tuple[Tensor, Tensor]:
    l2p = torch.arange(num_experts).view(1, num_experts, 1).repeat(num_layers, 1, 1)
    return l2p, torch.ones(num_layers, num_experts, dtype=torch.int64)


def _hook_state(layer: HFMoELayer) -> list[dict[int, object]]:
    modules = [layer.experts] + ([layer.router] if layer.router is not None else [])
    return [
        dict(getattr(m, name))
        for m in modules
        for name in (
            "_forward_pre_hooks",
            "_forward_hooks",
            "_forward_pre_hooks_with_kwargs",
            "_forward_hooks_with_kwargs",
        )
    ]


def _router_choices(adapter: HFMoEAdapter, run: object) -> tuple[Tensor, object]:
    """``[L, E]`` bincount of the experts each router returned, captured by our own hooks."""
    counts = torch.zeros(adapter.num_moe_layers, adapter.num_logical_experts, dtype=torch.int64)
    handles = []
    for i, layer in enumerate(adapter.layers):
        assert layer.router is not None

        def capture(module: nn.Module, args: object, out: object, i: int = i) -> None:
            assert isinstance(out, tuple)
            # (logits, top_k_weights, top_k_index), or Llama-4's (scores, logits)
            # where the router picks topk(logits).
            chosen = out[2] if len(out) == 3 else torch.topk(out[1], adapter.top_k, dim=-1).indices
            counts[i] += torch.bincount(chosen.flatten(), minlength=counts.shape[1])

        handles.append(layer.router.register_forward_hook(capture))
    try:
        assert callable(run)
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    return counts, result


def _package_files(module: types.ModuleType) -> list[Path]:
    """The source files of ``module``: every file of its package when it is one."""
    assert module.__file__ is not None
    path = Path(module.__file__)
    return sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]


# ---------------------------------------------------------------- every family


def test_view_resolves_through_wrapper_with_config_counts(family: tuple[Family, nn.Module]) -> None:
    spec, model = family
    view = MoEView.require(model, steps=STEPS)
    assert view.trace.resolved_path == spec.resolved_path
    assert is_mixture_of_experts(cast(object, view))  # object: the guard would narrow view
    assert check_conformance(view.model, path=spec.name).ok
    assert view.num_moe_layers == spec.num_moe_layers
    assert view.num_logical_experts == view.num_physical_experts == spec.num_experts
    assert view.num_local_physical_experts == view.num_routed_experts == spec.num_experts
    assert view.num_redundant_experts == 0
    assert view.num_expert_groups == spec.num_groups
    assert view.num_shared_experts == spec.num_shared_experts
    adapter = view.model
    assert isinstance(adapter, HFMoEAdapter)
    assert adapter.top_k == spec.top_k


def test_counts_are_the_routers_real_choices(family: tuple[Family, nn.Module]) -> None:
    spec, model = family
    adapter = _adapter(model)
    num_layers, num_experts = adapter.num_moe_layers, adapter.num_logical_experts
    load = torch.zeros(num_layers, num_experts, dtype=torch.int32)
    adapter.set_eplb_state(load, *_identity_maps(num_layers, num_experts))
    try:
        with torch.no_grad():
            chosen, _ = _router_choices(adapter, lambda: spec.run(model, _ids()))
        adapter.check_recording()
    finally:
        adapter.remove_hooks()
    assert load.sum(dim=1).tolist() == [TOKENS * spec.top_k] * num_layers
    assert torch.equal(load.to(torch.int64), chosen)


def test_expert_weights_reproduce_each_expert(family: tuple[Family, nn.Module]) -> None:
    _, model = family
    adapter = _adapter(model)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    for layer in adapter.layers:
        for expert in range(layer.num_experts):
            with torch.no_grad():
                if layer.recording_rule == INDEX_HOOK:
                    # Every token routed to `expert` alone, with weight 1.
                    ids = torch.full((5, 1), expert)
                    expected = layer.experts(x, ids, torch.ones(5, 1))
                else:
                    # Dense experts: block e of the [E * T, H] input goes to expert e.
                    dense = torch.zeros(layer.num_experts * 5, HIDDEN)
                    dense[expert * 5 : (expert + 1) * 5] = x
                    expected = layer.experts(dense)[expert * 5 : (expert + 1) * 5]
                got = layer.expert_forward(expert, x)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_layout_is_plain_linear_orientation(family: tuple[Family, nn.Module]) -> None:
    spec, model = family
    layer = _adapter(model).layers[0]
    w = layer.weights
    assert w.gate is not None
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for e in range(layer.num_experts):
            gate, up = x @ w.gate[e].T, x @ w.up[e].T
            if spec.name == "gpt_oss":
                # GPT-OSS's documented gate: clamped SwiGLU with alpha, "up + 1", and biases.
                assert w.gate_bias is not None
                assert w.up_bias is not None
                assert w.down_bias is not None
                limit, alpha = _tree(layer.experts).limit, _tree(layer.experts).alpha
                gate = (gate + w.gate_bias[e]).clamp(max=limit)
                up = (up + w.up_bias[e]).clamp(-limit, limit)
                by_hand = ((up + 1) * gate * torch.sigmoid(alpha * gate)) @ w.down[e].T
                by_hand = by_hand + w.down_bias[e]
            else:
                assert w.gate_bias is None
                act: Callable[[Tensor], Tensor] = _tree(layer.experts).act_fn
                assert callable(act)
                by_hand = (act(gate) * up) @ w.down[e].T
            torch.testing.assert_close(by_hand, layer.expert_forward(e, x))


def test_expert_weights_are_views_of_the_parameters(family: tuple[Family, nn.Module]) -> None:
    _, model = family
    adapter = _adapter(model)
    for layer, tensors in zip(adapter.layers, adapter.expert_weights, strict=True):
        storages = {p.untyped_storage().data_ptr() for p in layer.experts.parameters()}
        assert len(tensors) in (3, 6)
        for tensor in tensors:
            assert tensor.shape[0] == adapter.num_local_physical_experts
            assert tensor.untyped_storage().data_ptr() in storages
    up = adapter.layers[0].weights.up
    before = [p.detach().clone() for p in adapter.layers[0].experts.parameters()]
    with torch.no_grad():
        up[0].add_(1.0)  # writing the view writes the live parameter
        after = list(adapter.layers[0].experts.parameters())
        changed = [not torch.equal(a, p) for a, p in zip(before, after, strict=True)]
        up[0].sub_(1.0)
    assert any(changed)


def test_outputs_unchanged_with_hooks_installed(family: tuple[Family, nn.Module]) -> None:
    spec, model = family
    adapter = _adapter(model)
    with torch.no_grad():
        plain = spec.run(model, _ids(3))
        load = torch.zeros(adapter.num_moe_layers, adapter.num_logical_experts, dtype=torch.int64)
        adapter.set_eplb_state(load, *_identity_maps(*load.shape))
        try:
            hooked = spec.run(model, _ids(3))
        finally:
            adapter.remove_hooks()
    assert torch.equal(plain, hooked)
    assert int(load.sum()) == adapter.num_moe_layers * TOKENS * spec.top_k


def test_removing_hooks_leaves_no_trace(family: tuple[Family, nn.Module]) -> None:
    _, model = family
    adapter = _adapter(model)
    before = [_hook_state(layer) for layer in adapter.layers]
    load = torch.zeros(adapter.num_moe_layers, adapter.num_logical_experts, dtype=torch.int64)
    adapter.set_eplb_state(load, *_identity_maps(*load.shape))
    assert [_hook_state(layer) for layer in adapter.layers] != before
    adapter.remove_hooks()
    assert [_hook_state(layer) for layer in adapter.layers] == before
    assert not any(layer.is_recording for layer in adapter.layers)


def test_building_the_adapter_installs_nothing(family: tuple[Family, nn.Module]) -> None:
    _, model = family
    found = discover_hf_moe(model)
    before = [_hook_state(layer) for layer in found.layers]
    params = {name: p.data_ptr() for name, p in model.named_parameters()}
    MoEView.require(model, steps=STEPS)
    assert [_hook_state(layer) for layer in found.layers] == before
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == params


# ---------------------------------------------------------------- family specifics


def _build(name: str) -> nn.Module:
    return next(f for f in FAMILIES if f.name == name).build()


def _tree(module: nn.Module) -> Any:
    """``module`` untyped, to reach into a family's own module tree (built at run time)."""
    return module


def test_llama4_counts_come_from_the_router_output() -> None:
    model = _build("llama4_vlm")
    adapter = _adapter(model)
    assert all(layer.recording_rule == SCORES_HOOK for layer in adapter.layers)
    before = [dict(layer.experts._forward_pre_hooks) for layer in adapter.layers]
    load = torch.zeros(adapter.num_moe_layers, adapter.num_logical_experts, dtype=torch.int64)
    adapter.set_eplb_state(load, *_identity_maps(*load.shape))
    # The hook sits on the router; the dense experts module is left alone.
    assert [dict(layer.experts._forward_pre_hooks) for layer in adapter.layers] == before
    assert all(len(layer.router._forward_hooks) == 1 for layer in adapter.layers if layer.router)
    adapter.remove_hooks()


@pytest.mark.parametrize(("name", "groups"), [("deepseek_v3", 4), ("glm4v_moe", 2)])
def test_expert_groups_are_read_from_the_router(name: str, groups: int) -> None:
    adapter = _adapter(_build(name))
    assert all(layer.router is not None for layer in adapter.layers)
    assert [getattr(layer.router, "num_group", None) for layer in adapter.layers] == [
        groups
    ] * adapter.num_moe_layers
    assert adapter.num_expert_groups == groups


def test_dense_first_layers_are_not_moe_layers() -> None:
    adapter = _adapter(_build("deepseek_v3"))
    assert [layer.path for layer in adapter.layers] == [
        "model.layers.1.mlp.experts",
        "model.layers.2.mlp.experts",
    ]


@pytest.mark.parametrize("family_spec", OTHER_STANDARD_FAMILIES, ids=lambda f: f.name)
def test_other_standard_families_need_no_code_of_their_own(family_spec: Family) -> None:
    source = "".join(path.read_text() for path in _package_files(hf_package)).lower()
    model = family_spec.build()
    for word in (family_spec.name, type(model).__name__.lower()):
        assert word.replace("_", "") not in source.replace("_", "")
    assert MoEView.require(model, steps=STEPS).num_moe_layers == family_spec.num_moe_layers


# ---------------------------------------------------------------- recording guards


def test_hook_that_never_fired_is_reported_not_read_as_zero() -> None:
    model = _build("qwen3_moe")
    adapter = _adapter(model)
    block = _tree(model).model.layers[1].mlp

    def kernel_forward(self: nn.Module, hidden: Tensor) -> Tensor:
        # Like a hub kernel: computes the block without calling its experts module.
        return torch.zeros_like(hidden)

    block.forward = types.MethodType(kernel_forward, block)
    load = torch.zeros(adapter.num_moe_layers, adapter.num_logical_experts, dtype=torch.int64)
    adapter.set_eplb_state(load, *_identity_maps(*load.shape))
    with torch.no_grad():
        model(input_ids=_ids())
    assert adapter.hooks_fired == (True, False)
    assert int(load[1].sum()) == 0
    with pytest.raises(EplbStateError, match=r"never fired \(model\.layers\.1\.mlp\.experts\)"):
        adapter.check_recording()
    adapter.remove_hooks()


def test_recording_problems_before_set_eplb_state() -> None:
    adapter = _adapter(_build("mixtral"))
    assert adapter.recording_problems()
    with pytest.raises(EplbStateError, match="set_eplb_state"):
        adapter.check_recording()


def test_sentinel_ids_outside_the_experts_are_ignored() -> None:
    model = _build("qwen3_moe")
    _tree(model).set_experts_implementation("eager")  # its loop skips the id E ("not on this rank")
    adapter = _adapter(model)
    layer = adapter.layers[0]
    num_experts = layer.num_experts
    load = torch.zeros(adapter.num_moe_layers, num_experts, dtype=torch.int64)
    adapter.set_eplb_state(load, *_identity_maps(*load.shape))
    ids = torch.tensor([[0, num_experts], [num_experts, 3], [3, 1]])
    with torch.no_grad():
        layer.experts(torch.randn(3, HIDDEN), ids, torch.ones(3, 2))
    adapter.remove_hooks()
    assert load[0].tolist() == [1, 1, 0, 2] + [0] * (num_experts - 4)


def test_counts_do_not_depend_on_the_experts_backend() -> None:
    model = _build("qwen3_moe")
    adapter = _adapter(model)
    loads = []
    for implementation in ("eager", "grouped_mm"):
        _tree(model).set_experts_implementation(implementation)
        load = torch.zeros(adapter.num_moe_layers, adapter.num_logical_experts, dtype=torch.int64)
        adapter.set_eplb_state(load, *_identity_maps(*load.shape))
        with torch.no_grad():
            model(input_ids=_ids())
        loads.append(load)
    adapter.remove_hooks()
    assert torch.equal(loads[0], loads[1])


def test_set_eplb_state_again_replaces_the_hooks() -> None:
    model = _build("olmoe")
    adapter = _adapter(model)
    first = torch.zeros(adapter.num_moe_layers, adapter.num_logical_experts, dtype=torch.int64)
    second = torch.zeros_like(first)
    adapter.set_eplb_state(first, *_identity_maps(*first.shape))
    adapter.set_eplb_state(second, *_identity_maps(*first.shape))
    assert all(len(layer.experts._forward_pre_hooks) == 1 for layer in adapter.layers)
    with torch.no_grad():
        model(input_ids=_ids())
    adapter.remove_hooks()
    assert int(first.sum()) == 0
    assert int(second.sum()) == adapter.num_moe_layers * TOKENS * adapter.top_k


# ---------------------------------------------------------------- rejecting bad input


@pytest.fixture(scope="module")
def qwen3() -> nn.Module:
    return _build("qwen3_moe")


@pytest.mark.parametrize(
    ("load_shape", "dtype", "error"),
    [
        ((2, 9), torch.int64, EplbStateError),  # P != E: no redundant slots exist
        ((3, 8), torch.int64, EplbStateError),  # wrong number of layers
        ((2, 8), torch.bool, EplbStateError),
    ],
)
def test_bad_load_view_installs_nothing(
    qwen3: nn.Module, load_shape: tuple[int, int], dtype: torch.dtype, error: type[Exception]
) -> None:
    adapter = _adapter(qwen3)
    before = [_hook_state(layer) for layer in adapter.layers]
    with pytest.raises(error):
        adapter.set_eplb_state(torch.zeros(load_shape, dtype=dtype), *_identity_maps(2, 8))
    assert [_hook_state(layer) for layer in adapter.layers] == before


def test_non_identity_placement_is_rejected(qwen3: nn.Module) -> None:
    adapter = _adapter(qwen3)
    before = [_hook_state(layer) for layer in adapter.layers]
    l2p, count = _identity_maps(2, 8)
    l2p[1, :, 0] = torch.arange(8).flip(0)
    with pytest.raises(MappingError, match="identity placement"):
        adapter.set_eplb_state(torch.zeros(2, 8, dtype=torch.int64), l2p, count)
    assert [_hook_state(layer) for layer in adapter.layers] == before


def test_placement_changed_after_registration_is_reported(qwen3: nn.Module) -> None:
    adapter = _adapter(qwen3)
    l2p, count = _identity_maps(2, 8)
    adapter.set_eplb_state(torch.zeros(2, 8, dtype=torch.int64), l2p, count)
    with torch.no_grad():
        qwen3(input_ids=_ids())
    adapter.check_recording()
    l2p[0, :, 0] = torch.arange(8).roll(1)  # an EPLB state rewrote the live map in place
    with pytest.raises(EplbStateError, match="identity placement"):
        adapter.check_recording()
    adapter.remove_hooks()


def test_physical_counts_cannot_change(qwen3: nn.Module) -> None:
    adapter = _adapter(qwen3)
    adapter.update_physical_experts_metadata(num_physical_experts=8, num_local_physical_experts=8)
    with pytest.raises(EplbStateError, match="logical expert id"):
        adapter.update_physical_experts_metadata(
            num_physical_experts=16, num_local_physical_experts=8
        )
    adapter.num_physical_experts = 8
    with pytest.raises(EplbStateError, match="num_redundant_experts"):
        adapter.num_redundant_experts = 4
    assert (adapter.num_physical_experts, adapter.num_redundant_experts) == (8, 0)


# ---------------------------------------------------------------- discovery rules


def test_from_module_explains_a_dense_model() -> None:
    import transformers as tf

    dense = tf.Qwen3ForCausalLM(
        tf.Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
    )
    assert HF_EXPERTS_STEP.probe(dense) is None
    with pytest.raises(NotMixtureOfExpertsError, match="no transformers experts modules"):
        HFMoEAdapter.from_module(dense)
    assert MoEView.resolve(dense, steps=STEPS) is None


def test_probe_ignores_non_modules() -> None:
    assert HF_EXPERTS_STEP.probe(object()) is None
    assert HF_EXPERTS_STEP.probe(types.SimpleNamespace(experts=1)) is None
    assert HF_EXPERTS_STEP.probe(MagicMock()) is None  # answers every probe, is no module
    assert HF_GET_DECODER_STEP.probe(object()) is None
    assert HF_GET_DECODER_STEP.probe(MagicMock()) is None


class _Omni(nn.Module):
    """Two different MoE language models side by side, like an omni model's thinker and talker."""

    def __init__(self, thinker: nn.Module, talker: nn.Module) -> None:
        super().__init__()
        self.thinker = thinker
        self.talker = talker


def test_two_language_models_resolve_to_the_thinker() -> None:
    omni = _Omni(_build("qwen3_moe"), _build("mixtral"))
    assert HF_EXPERTS_STEP.probe(omni) is None
    assert "different (experts, top_k)" in str(discover_hf_moe(omni).problem)
    view = MoEView.require(omni, steps=STEPS)
    assert view.trace.resolved_path == "model.thinker -> hf-experts adapter"
    assert view.num_logical_experts == 8


def test_two_layer_stacks_with_equal_shapes_are_two_models() -> None:
    omni = _Omni(_build("qwen3_moe"), _build("qwen3_moe"))
    assert "2 layer stacks" in str(discover_hf_moe(omni).problem)
    assert MoEView.require(omni, steps=STEPS).trace.resolved_path == (
        "model.thinker -> hf-experts adapter"
    )


class _DataParallelLike(nn.Module):
    """Holds the model under ``.module``, as DDP/DataParallel/FSDP1 do."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


# torch.compile's first use imports modules that still define torch.jit script methods.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_and_data_parallel_models_resolve_through_their_wrappers() -> None:
    compiled = torch.compile(_build("qwen3_moe"))  # compiles lazily: nothing runs here
    view = MoEView.require(compiled, steps=STEPS)
    assert view.trace.resolved_path == "model._orig_mod -> hf-experts adapter"
    wrapped = _DataParallelLike(_build("glm4v_moe"))
    view = MoEView.require(wrapped, steps=STEPS)
    assert view.trace.resolved_path == "model.module.model.language_model -> hf-experts adapter"
    assert view.num_expert_groups == 2


class _DecoderHolder(nn.Module):
    """Holds the model under ``.decoder``, which no default step knows."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder


def test_adapter_is_built_below_a_user_unwrap_step_not_over_it() -> None:
    holder = _DecoderHolder(_build("qwen3_vl_moe"))
    unwrap = UnwrapStep(".decoder", attribute_probe("decoder"))
    view = MoEView.require(holder, steps=(*STEPS, unwrap))
    assert view.trace.resolved_path == "model.decoder.model.language_model -> hf-experts adapter"
    descend = UnwrapStep(".decoder", attribute_probe("decoder"), kind="descend")
    view = MoEView.require(holder, steps=(*STEPS, descend))
    assert view.trace.resolved_path == "model -> hf-experts adapter"


def test_experts_are_found_from_the_expert_parallel_plan() -> None:
    model = _build("qwen3_moe")
    for decoder_layer in _tree(model).model.layers:
        block = decoder_layer.mlp
        block.routed = block.experts  # a block that names its experts module differently
        del block.experts
    assert discover_hf_moe(model).layers == ()
    _tree(model)._ep_plan = {"model.layers.*.mlp.routed": "ep_dispatch_experts"}
    found = discover_hf_moe(model)
    assert [layer.path for layer in found.layers] == [
        "model.layers.0.mlp.routed",
        "model.layers.1.mlp.routed",
    ]
    assert found.layers[0].top_k == 2


def test_quantized_experts_are_refused_with_the_reason() -> None:
    model = _build("qwen3_moe")
    experts = _tree(model).model.layers[0].mlp.experts
    experts.register_buffer("gate_up_proj_scale_inv", torch.ones(8, 1, 1))  # FP8-style
    problem = str(discover_hf_moe(model).problem)
    assert "quantized" in problem
    assert "model.layers.0.mlp.experts" in problem
    assert HF_EXPERTS_STEP.probe(model) is None


def test_experts_without_dense_projections_are_refused_with_the_reason() -> None:
    model = _build("qwen3_moe")
    experts = _tree(model).model.layers[1].mlp.experts
    # MXFP4-style: the fused projections are replaced by packed blocks.
    del experts.gate_up_proj
    experts.register_buffer("gate_up_proj_blocks", torch.zeros(8, 32, 2, dtype=torch.uint8))
    problem = str(discover_hf_moe(model).problem)
    assert "model.layers.1.mlp.experts" in problem
    assert "quantized" in problem


def test_library_module_does_not_import_transformers() -> None:
    for path in (*_package_files(hf_package), *_package_files(profiling_module)):
        tree = ast.parse(path.read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in (node.names if isinstance(node, ast.Import) else [])
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
        }
        assert "transformers" not in imported


def test_every_family_registers_with_an_eplb_state(family: tuple[Family, nn.Module]) -> None:
    # The fused gate/up weights are two interleaved views of one tensor that share
    # no element: registration must accept them, and the state must then record.
    spec, model = family
    view = MoEView.require(model, steps=STEPS)
    with EplbState(EplbConfig()) as state:
        state.add_model(view)
        with torch.no_grad():
            spec.run(model, _ids())
        state.step()
        recorded = int(state.expert_load_window().sum())
    assert recorded == TOKENS * spec.top_k * spec.num_moe_layers
    view.model.remove_hooks()  # type: ignore[attr-defined]  # the adapter's own method
