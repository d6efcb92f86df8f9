"""The reference models: shapes, determinism, the MoE contract, routing, recording."""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from moe_protocols.eplb._maps import compute_logical_maps, max_replicas
from moe_protocols.errors import EplbConfigError, EplbStateError, MappingError
from moe_protocols.models import (
    ModelConfigError,
    ModelInputError,
    TinyMoEBlock,
    TinyMoEConfig,
    TinyMoEForCausalLM,
    TinyVLMConfig,
    grouped_topk,
    tiny_moe,
    tiny_proxy_vlm,
    tiny_vlm,
)
from moe_protocols.parallel import ExpertParallelContext
from moe_protocols.protocols import COUNT_MEMBERS, MixtureOfExperts, MoELayer


def token_ids(batch: int = 4, seq: int = 16, vocab: int = 128, seed: int = 1) -> Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def blocks(model: TinyMoEForCausalLM) -> list[TinyMoEBlock]:
    """The model's MoE blocks with their concrete type (the tests look inside them)."""
    return model._moe_blocks


def load_tensors(model: TinyMoEForCausalLM, placement: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Model-wide EPLB tensors for ``placement [moe_layers, physical]``: (load, l2p, count)."""
    num_logical, num_physical = model.num_logical_experts, model.num_physical_experts
    l2p, count = compute_logical_maps(
        placement, num_logical, max_replicas(num_logical, num_physical)
    )
    load = torch.zeros(model.num_moe_layers, num_physical, dtype=torch.int64)
    return load, l2p, count


def logical_expert_weights(model: TinyMoEForCausalLM) -> list[list[Tensor]]:
    """Per MoE layer, each weight tensor's rows for logical experts 0..E-1 (initial placement)."""
    return [
        [w[: model.num_logical_experts].clone() for w in block.get_expert_weights()]
        for block in model.moe_layers
    ]


def apply_placement(
    model: TinyMoEForCausalLM, logical: list[list[Tensor]], placement: Tensor
) -> Tensor:
    """Move experts by hand as EPLB would: copy weights into slots, then hand over new maps."""
    for layer, block in enumerate(model.moe_layers):
        for weight, source in zip(block.get_expert_weights(), logical[layer], strict=True):
            weight.copy_(source[placement[layer]])
    load, l2p, count = load_tensors(model, placement)
    model.set_eplb_state(load, l2p, count)
    return load


def initial_placement(model: TinyMoEForCausalLM) -> Tensor:
    num_logical, num_physical = model.num_logical_experts, model.num_physical_experts
    row = list(range(num_logical)) + [i % num_logical for i in range(num_physical - num_logical)]
    return torch.tensor([row] * model.num_moe_layers)


# ------------------------------------------------------------------ shapes and determinism


def test_lm_maps_token_ids_to_logits_per_position() -> None:
    model = tiny_moe()
    with torch.no_grad():
        logits = model(token_ids())
    assert logits.shape == (4, 16, 128)
    assert bool(torch.isfinite(logits).all())


def test_lm_runs_from_inputs_embeds_like_from_ids() -> None:
    model = tiny_moe()
    ids = token_ids()
    with torch.no_grad():
        from_ids = model(ids)
        from_embeds = model(inputs_embeds=model.embed_input_ids(ids))
    assert model.embed_input_ids(ids).shape == (4, 16, 32)
    assert torch.equal(from_ids, from_embeds)


def test_lm_rejects_ambiguous_or_malformed_inputs() -> None:
    model = tiny_moe()
    ids = token_ids()
    with pytest.raises(ModelInputError, match="exactly one"):
        model(ids, inputs_embeds=model.embed_input_ids(ids))
    with pytest.raises(ModelInputError, match="exactly one"):
        model()
    with pytest.raises(ModelInputError, match=r"\[batch, seq\]"):
        model(ids.reshape(-1))
    with pytest.raises(ModelInputError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(2, 3, 7))


def test_equal_configs_build_parameter_equal_models() -> None:
    config = TinyMoEConfig(num_redundant_experts=2, num_shared_experts=1)
    first, second = TinyMoEForCausalLM(config), TinyMoEForCausalLM(config)
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    other = TinyMoEForCausalLM(attrs.evolve(config, seed=1))
    assert not torch.equal(first.embed_tokens, other.embed_tokens)


def test_building_a_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_vlm()
    assert torch.equal(torch.rand(3), expected)


def test_vlm_prepends_image_tokens_that_reach_the_text_logits() -> None:
    model = tiny_vlm()
    ids = token_ids(batch=2, seq=5)
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids, images)
        other = model(ids, images + 1.0)
        text_only = model(ids)
    num_image_tokens = TinyVLMConfig().num_image_tokens
    assert logits.shape == (2, num_image_tokens + 5, 128)
    assert not torch.equal(logits[:, num_image_tokens:], other[:, num_image_tokens:])
    assert torch.equal(text_only, model.get_language_model()(ids))


def test_vlm_rejects_images_of_the_wrong_shape_or_batch() -> None:
    model = tiny_vlm()
    with pytest.raises(ModelInputError, match="pixel_values"):
        model(token_ids(batch=2), torch.zeros(2, 3, 9, 9))
    with pytest.raises(ModelInputError, match="batch"):
        model(token_ids(batch=2), torch.zeros(3, 3, 8, 8))


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"top_k": 9}, ModelConfigError, "top_k=9 exceeds num_experts=8"),
        ({"num_expert_groups": 3}, ModelConfigError, "not divisible"),
        ({"num_expert_groups": 2, "topk_groups": 3}, ModelConfigError, "topk_groups=3"),
        ({"num_expert_groups": 4, "topk_groups": 1, "top_k": 3}, ModelConfigError, "selected"),
        ({"first_k_dense": 5}, ModelConfigError, "first_k_dense=5"),
        ({"hidden_size": 0}, ModelConfigError, "hidden_size must be >= 1"),
        ({"num_redundant_experts": -1}, EplbConfigError, "num_redundant_experts"),
    ],
)
def test_bad_configs_are_rejected_with_the_field_named(
    overrides: dict[str, int], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        TinyMoEConfig(**overrides)


def test_factories_reject_unknown_settings_by_name() -> None:
    with pytest.raises(ModelConfigError, match="no_such_field"):
        tiny_moe(no_such_field=1)
    with pytest.raises(ModelConfigError, match="no_such_field"):
        tiny_vlm(no_such_field=1)


def test_vlm_factory_routes_settings_to_the_right_config() -> None:
    model = tiny_vlm(num_redundant_experts=2, patch_size=2, seed=5)
    assert model.config.patch_size == 2
    assert model.config.seed == model.config.text.seed == 5
    assert model.get_language_model().num_redundant_experts == 2


def test_bool_is_not_accepted_as_a_count() -> None:
    with pytest.raises(ModelConfigError, match="must be an int"):
        TinyMoEConfig(top_k=True)


def test_vlm_config_requires_whole_patches() -> None:
    with pytest.raises(ModelConfigError, match="patch_size"):
        TinyVLMConfig(image_size=10, patch_size=4)


def test_slots_must_split_evenly_over_ep_ranks() -> None:
    with pytest.raises(EplbConfigError, match="3 EP ranks"):
        tiny_moe(ep=ExpertParallelContext(world_size=3))


# ------------------------------------------------------------------ the contract


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_redundant_experts": 4, "num_shared_experts": 1},
        {"num_expert_groups": 4, "topk_groups": 2, "num_layers": 3, "first_k_dense": 0},
    ],
)
def test_lm_satisfies_the_moe_protocol_and_its_count_invariants(overrides: dict[str, int]) -> None:
    config = TinyMoEConfig(**overrides)
    model = TinyMoEForCausalLM(config)
    assert isinstance(model, MixtureOfExperts)
    assert all(isinstance(layer, MoELayer) for layer in model.moe_layers)
    assert list(model.expert_weights) == []
    assert model.num_moe_layers == len(model.moe_layers) == config.num_moe_layers
    assert model.num_physical_experts == model.num_logical_experts + model.num_redundant_experts
    assert model.num_routed_experts == model.num_logical_experts == config.num_experts
    assert model.num_physical_experts % model.num_local_physical_experts == 0
    assert model.num_shared_experts == config.num_shared_experts
    assert model.num_expert_groups == config.num_expert_groups


def test_local_slot_count_follows_the_ep_world() -> None:
    model = tiny_moe(num_redundant_experts=8, ep=ExpertParallelContext(world_size=4, rank=2))
    assert model.num_physical_experts == 16
    assert model.num_local_physical_experts == 4
    assert all(w.shape[0] == 4 for b in model.moe_layers for w in b.get_expert_weights())


def test_vlm_wrapper_does_not_implement_mixture_of_experts() -> None:
    model = tiny_vlm()
    assert not isinstance(model, MixtureOfExperts)
    for member in (*COUNT_MEMBERS, "expert_weights", "moe_layers", "set_eplb_state"):
        assert not hasattr(model, member), member
    assert isinstance(model.get_language_model(), MixtureOfExperts)
    assert model.get_language_model() is model.language_model


def test_proxy_vlm_forwards_every_member_to_its_language_model() -> None:
    proxy = tiny_proxy_vlm(num_redundant_experts=4)
    lm = proxy.get_language_model()
    assert isinstance(proxy, MixtureOfExperts)
    for member in COUNT_MEMBERS:
        assert getattr(proxy, member) == getattr(lm, member), member
    assert proxy.moe_layers is lm.moe_layers

    load, l2p, count = load_tensors(lm, initial_placement(lm))
    proxy.set_eplb_state(load, l2p, count)
    assert proxy.expert_weights is lm.expert_weights
    assert len(lm.expert_weights) == lm.num_moe_layers
    with torch.no_grad():
        proxy(token_ids(batch=1, seq=4))
    assert int(load.sum()) == lm.num_moe_layers * 4 * lm.config.top_k

    proxy.update_physical_experts_metadata(num_physical_experts=24, num_local_physical_experts=12)
    assert lm.num_physical_experts == proxy.num_physical_experts == 24
    assert lm.num_redundant_experts == 16
    proxy.num_expert_groups = 2
    assert lm.num_expert_groups == 2


def test_expert_weights_are_live_views_of_the_slot_parameters() -> None:
    model = tiny_moe()
    block = blocks(model)[0]
    w13, w2 = block.get_expert_weights()
    assert w13.shape == (8, 2 * 64 * 32)
    assert w2.shape == (8, 32 * 64)
    w13[3] = w13[5]
    assert torch.equal(block.w13[3], block.w13[5])

    load, l2p, count = load_tensors(model, initial_placement(model))
    model.set_eplb_state(load, l2p, count)
    assert model.expert_weights[0][0].data_ptr() == block.w13.data_ptr()


def test_redundant_slots_hold_copies_of_their_logical_expert() -> None:
    model = tiny_moe(num_redundant_experts=6)
    for block in model.moe_layers:
        for weight in block.get_expert_weights():
            for extra in range(6):
                assert torch.equal(weight[8 + extra], weight[extra % 8])


def test_each_ep_rank_holds_its_own_slice_of_the_same_slots() -> None:
    whole = tiny_moe(num_redundant_experts=4)
    for rank in range(3):
        part = tiny_moe(num_redundant_experts=4, ep=ExpertParallelContext(world_size=3, rank=rank))
        assert torch.equal(part.embed_tokens, whole.embed_tokens)
        for whole_block, part_block in zip(whole.moe_layers, part.moe_layers, strict=True):
            for full, local in zip(
                whole_block.get_expert_weights(), part_block.get_expert_weights(), strict=True
            ):
                assert torch.equal(local, full[rank * 4 : (rank + 1) * 4])


# ------------------------------------------------------------------ routing and recording


def test_routing_sends_token_t_to_replica_t_mod_replica_count() -> None:
    model = tiny_moe(num_redundant_experts=8)
    block = blocks(model)[0]
    # Expert 0 gets 3 replicas, expert 1 gets 2, ... in a scrambled slot order.
    row = [0, 5, 0, 1, 2, 3, 4, 6, 7, 0, 1, 2, 3, 4, 5, 6]
    placement = torch.tensor([row] * model.num_moe_layers)
    load, l2p, count = load_tensors(model, placement)
    model.set_eplb_state(load, l2p, count)
    logical_ids = torch.randint(0, 8, (40, 2), generator=torch.Generator().manual_seed(0))
    physical = block.map_to_physical(logical_ids)
    for token in range(40):
        for k in range(2):
            expert = int(logical_ids[token, k])
            replicas = [slot for slot, e in enumerate(row) if e == expert]
            assert int(physical[token, k]) == replicas[token % len(replicas)]


def test_recording_adds_one_per_token_expert_pair_once_eplb_state_is_set() -> None:
    model = tiny_moe(num_redundant_experts=8)
    ids = token_ids()
    load, l2p, count = load_tensors(model, initial_placement(model))
    with torch.no_grad():
        model(ids)  # no EPLB state yet: nothing to record into
        assert int(load.sum()) == 0
        model.set_eplb_state(load, l2p, count)
        model(ids)
    tokens = ids.numel()
    assert load.sum(dim=1).tolist() == [tokens * 2] * model.num_moe_layers
    # The counts sit on the physical slots the tokens were actually sent to.
    block = blocks(model)[-1]
    captured: list[Tensor] = []
    handle = block.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    physical = block.map_to_physical(block.route(captured[0])[1])
    expected = torch.bincount(physical.reshape(-1), minlength=16) * 2
    assert torch.equal(load[-1], expected)
    assert bool((load[-1, 8:] > 0).any())  # replicas in the redundant slots served tokens


def test_recording_can_be_switched_off_at_model_level() -> None:
    model = tiny_moe()
    load, l2p, count = load_tensors(model, initial_placement(model))
    model.set_eplb_state(load, l2p, count)
    model.record_expert_load = False
    with torch.no_grad():
        model(token_ids())
    assert int(load.sum()) == 0
    model.record_expert_load = True
    with torch.no_grad():
        model(token_ids())
    assert int(load.sum()) == model.num_moe_layers * 64 * 2


def test_grouped_topk_only_picks_experts_from_the_best_groups() -> None:
    scores = torch.rand(200, 12, generator=torch.Generator().manual_seed(0)).softmax(dim=-1)
    weights, ids = grouped_topk(scores, top_k=3, num_expert_groups=4, topk_groups=2)
    group_best = scores.view(200, 4, 3).amax(dim=-1)
    chosen_groups = group_best.topk(2, dim=-1).indices
    for token in range(200):
        groups = {int(e) // 3 for e in ids[token]}
        assert groups <= {int(g) for g in chosen_groups[token]}
    assert torch.allclose(weights.sum(dim=-1), torch.ones(200))
    # Grouping is a restriction: some tokens must lose an expert plain top-k would pick.
    plain = scores.topk(3, dim=-1).indices
    assert not torch.equal(ids.sort(dim=-1).values, plain.sort(dim=-1).values)


def test_model_routing_respects_group_limits() -> None:
    model = tiny_moe(num_experts=8, num_expert_groups=4, topk_groups=2, top_k=3)
    block = blocks(model)[0]
    hidden = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    _, ids = block.route(hidden)
    assert max(len({int(e) // 2 for e in row}) for row in ids) <= 2


# ------------------------------------------------------------------ placement independence


def test_redundant_replicas_do_not_change_the_logits() -> None:
    ids = token_ids()
    with torch.no_grad():
        plain = tiny_moe(num_shared_experts=1)(ids)
        replicated = tiny_moe(num_shared_experts=1, num_redundant_experts=8)(ids)
    assert torch.equal(plain, replicated)


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_logits_are_bit_identical_after_experts_move_and_replicate(data: st.DataObject) -> None:
    model = tiny_moe(num_redundant_experts=8, num_expert_groups=2, topk_groups=1)
    ids = token_ids()
    with torch.no_grad():
        before = model(ids)
    logical = logical_expert_weights(model)
    rows = []
    for _ in range(model.num_moe_layers):
        extra = data.draw(st.lists(st.integers(0, 7), min_size=8, max_size=8))
        rows.append(data.draw(st.permutations(list(range(8)) + extra)))
    placement = torch.tensor(rows)
    load = apply_placement(model, logical, placement)
    with torch.no_grad():
        after = model(ids)
    assert torch.equal(before, after)
    assert int(load.sum()) == model.num_moe_layers * ids.numel() * 2


def test_bit_exactness_is_not_vacuous_tokens_do_change_slots() -> None:
    model = tiny_moe(num_redundant_experts=8)
    block = blocks(model)[0]
    logical_ids = torch.arange(8).repeat(4).view(16, 2)
    before = block.map_to_physical(logical_ids)
    placement = torch.tensor([[7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 0, 1, 1, 2, 3, 4]] * 3)
    apply_placement(model, logical_expert_weights(model), placement)
    assert not torch.equal(before, block.map_to_physical(logical_ids))


# ------------------------------------------------------------------ EPLB state and metadata


def test_set_eplb_state_rejects_misshapen_tensors_and_keeps_the_old_state() -> None:
    model = tiny_moe()
    block = blocks(model)[0]
    load, l2p, count = load_tensors(model, initial_placement(model))
    with pytest.raises(
        EplbStateError, match=r"expert_load_view must be a \[moe_layers, 8\] tensor"
    ):
        block.set_eplb_state(0, torch.zeros(3, 9), l2p, count)
    with pytest.raises(MappingError, match="logical_to_physical_map"):
        block.set_eplb_state(0, load, l2p[:, :4], count)
    with pytest.raises(MappingError, match="logical_replica_count"):
        block.set_eplb_state(0, load, l2p, count.float())
    with pytest.raises(EplbStateError, match="moe_layer_idx=5"):
        block.set_eplb_state(5, load, l2p, count)
    assert not block.eplb_state_is_set


def test_a_map_that_sends_tokens_nowhere_is_refused_at_forward() -> None:
    model = tiny_moe()
    load, l2p, count = load_tensors(model, initial_placement(model))
    count[:, 3] = 0
    model.set_eplb_state(load, l2p, count)
    with pytest.raises(MappingError, match="replica count"), torch.no_grad():
        model(token_ids())


def test_update_physical_experts_metadata_adopts_new_slot_counts() -> None:
    model = tiny_moe(num_redundant_experts=8, ep=ExpertParallelContext(world_size=2, rank=1))
    model.update_physical_experts_metadata(num_physical_experts=24, num_local_physical_experts=8)
    assert model.num_physical_experts == 24
    assert model.num_redundant_experts == 16
    assert model.num_local_physical_experts == 8
    assert all(block.num_physical_experts == 24 for block in blocks(model))


def test_update_physical_experts_metadata_refuses_a_new_local_count_and_changes_nothing() -> None:
    model = tiny_moe(num_redundant_experts=8)
    before = {member: getattr(model, member) for member in COUNT_MEMBERS}
    with pytest.raises(EplbStateError, match="num_local_physical_experts=8"):
        model.update_physical_experts_metadata(
            num_physical_experts=16, num_local_physical_experts=8
        )
    with pytest.raises(EplbStateError, match="num_physical_experts=4"):
        model.update_physical_experts_metadata(
            num_physical_experts=4, num_local_physical_experts=16
        )
    assert {member: getattr(model, member) for member in COUNT_MEMBERS} == before
    assert all(block.num_physical_experts == 16 for block in blocks(model))


def test_forward_refuses_slot_counts_its_ep_group_cannot_hold() -> None:
    model = tiny_moe()
    model.update_physical_experts_metadata(num_physical_experts=16, num_local_physical_experts=8)
    with pytest.raises(EplbStateError, match="16 physical experts do not match 1 EP ranks"):
        model(token_ids())
    model.update_physical_experts_metadata(num_physical_experts=8, num_local_physical_experts=8)
    with torch.no_grad():
        model(token_ids())


def test_inherited_set_eplb_state_hands_each_layer_its_own_row() -> None:
    model = tiny_moe(num_layers=3, first_k_dense=0)
    load, l2p, count = load_tensors(model, initial_placement(model))
    model.set_eplb_state(load, l2p, count)
    with torch.no_grad():
        blocks(model)[1](torch.randn(5, 32, generator=torch.Generator().manual_seed(0)))
    assert load.sum(dim=1).tolist() == [0, 10, 0]


def test_balanced_replica_dispatch_leaves_outputs_unchanged_and_rejects_unknown_modes() -> None:
    model = tiny_moe(num_experts=8, num_redundant_experts=8, num_expert_groups=2, topk_groups=1)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = model(ids)
        model.replica_dispatch = "balanced"
        assert all(block.replica_dispatch == "balanced" for block in blocks(model))
        assert torch.allclose(model(ids), expected, rtol=0, atol=1e-6)
    with pytest.raises(ModelConfigError, match="replica_dispatch"):
        model.replica_dispatch = "random"  # type: ignore[assignment]  # rejected at run time
    assert model.replica_dispatch == "balanced"
