"""EplbState: config, registration, per-step recording, rearrangement, restoring placements."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import pytest
import torch

from moe_protocols.eplb import (
    DEFAULT_POLICIES,
    EplbConfig,
    EplbState,
    Placement,
    PolicyRegistry,
    TransferOptions,
    _transfer,
    balancedness,
    compute_logical_maps,
    expected_rank_loads,
    initial_placement,
    load_placement,
    max_replicas,
)
from moe_protocols.errors import (
    EplbConfigError,
    EplbStateError,
    MappingError,
    NotMixtureOfExpertsError,
    PolicyError,
    TransferError,
)
from moe_protocols.models import TinyMoEConfig, TinyMoEForCausalLM, tiny_vlm
from moe_protocols.parallel import ExpertParallelContext

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path

REDUNDANT = 4
NUM_EXPERTS = 8  # tiny_moe's default
NUM_PHYSICAL = NUM_EXPERTS + REDUNDANT
NUM_MOE_LAYERS = 3  # tiny_moe: 4 layers, the first dense


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny forwards are slower multi-threaded on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(**overrides: int) -> TinyMoEForCausalLM:
    """The tiny MoE LM with ``REDUNDANT`` redundant slots unless overridden."""
    overrides.setdefault("num_redundant_experts", REDUNDANT)
    return TinyMoEForCausalLM(attrs.evolve(TinyMoEConfig(), **overrides))


def state_for(target: TinyMoEForCausalLM, **config: object) -> EplbState:
    settings: dict[str, object] = {"num_redundant_experts": target.num_redundant_experts}
    settings.update(config)
    state = EplbState(EplbConfig(**settings))  # type: ignore[arg-type]  # typed by EplbConfig
    state.add_model(target)
    return state


def batch() -> torch.Tensor:
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))


def skew(state: EplbState, hot: dict[int, int], base: int = 5) -> None:
    """Write a load into the pass: ``hot[expert]`` tokens on every layer, ``base`` elsewhere."""
    live = state.model_state()
    live.expert_load_pass.fill_(base)
    for expert, tokens in hot.items():
        slot = int((live.physical_to_logical_map[0] == expert).nonzero()[0])
        live.expert_load_pass[:, slot] = tokens


def logical_load(p2l: torch.Tensor, physical: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(p2l.shape[0], NUM_EXPERTS, dtype=torch.int64)
    return out.scatter_add_(1, p2l, physical.to(torch.int64))


def per_slot_balancedness(p2l: torch.Tensor, load: torch.Tensor) -> float:
    """Balancedness as if every slot were a rank: how evenly replicas share the load."""
    return float(balancedness(expected_rank_loads(p2l, load, p2l.shape[1])).mean())


def snapshot(state: EplbState, name: str = "model") -> dict[str, torch.Tensor]:
    live = state.model_state(name)
    tensors = {
        "p2l": live.physical_to_logical_map,
        "l2p": live.logical_to_physical_map,
        "count": live.logical_replica_count,
        "pass": live.expert_load_pass,
        "window": live.expert_load_window,
    }
    for layer, weights in enumerate(live.model.expert_weights):
        for k, w in enumerate(weights):
            tensors[f"w{layer}.{k}"] = w
    return {key: t.clone() for key, t in tensors.items()}


def assert_unchanged(
    state: EplbState, before: dict[str, torch.Tensor], name: str = "model"
) -> None:
    after = snapshot(state, name)
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed == []


def shuffled_placement(seed: int) -> torch.Tensor:
    """A placement that moves primary experts and replicas on every layer."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(NUM_MOE_LAYERS):
        extra = torch.randint(0, NUM_EXPERTS, (REDUNDANT,), generator=g)
        row = torch.cat([torch.arange(NUM_EXPERTS), extra])
        rows.append(row[torch.randperm(NUM_PHYSICAL, generator=g)])
    return torch.stack(rows)


class ShiftPolicy:
    """A test policy: rotate every layer's placement by one slot (moves every expert)."""

    name = "shift"

    def rebalance_experts(
        self,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_physical_to_logical_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert old_physical_to_logical_map is not None
        return old_physical_to_logical_map.roll(1, dims=1)


class BrokenPolicy:
    """A test policy that returns a placement leaving expert 0 without a replica."""

    name = "broken"

    def rebalance_experts(
        self,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_physical_to_logical_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return torch.ones(weight.shape[0], num_replicas, dtype=torch.int64)


class CrashingPolicy(BrokenPolicy):
    """A test policy with a bug: it raises a plain exception."""

    name = "crashing"

    def rebalance_experts(
        self,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_physical_to_logical_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise ZeroDivisionError("policy bug")


# --------------------------------------------------------------------------- config


def test_config_defaults_follow_vllm() -> None:
    config = EplbConfig()
    assert (config.window_size, config.step_interval, config.num_redundant_experts) == (
        1000,
        3000,
        0,
    )
    assert (config.log_balancedness, config.log_balancedness_interval) == (False, 1)
    assert config.policy == "deepseek"


BAD_CONFIGS: list[tuple[dict[str, object], str]] = [
    ({"window_size": 0}, "window_size must be > 0"),
    ({"window_size": -3}, "window_size must be > 0"),
    ({"window_size": 2.0}, "window_size must be an int"),
    ({"window_size": True}, "window_size must be an int"),
    ({"step_interval": 0}, "step_interval must be > 0"),
    ({"step_interval": "100"}, "step_interval must be an int"),
    ({"num_redundant_experts": -1}, "num_redundant_experts must be >= 0"),
    ({"num_redundant_experts": False}, "num_redundant_experts must be an int"),
    ({"log_balancedness": 1}, "log_balancedness must be a bool"),
    ({"log_balancedness_interval": 0}, "log_balancedness_interval must be > 0"),
    ({"log_balancedness_interval": True}, "log_balancedness_interval must be an int"),
    ({"policy": ""}, "policy must be a non-empty policy name"),
    ({"policy": 3}, "policy must be a non-empty policy name"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_CONFIGS)
def test_bad_config_values_are_rejected(fields: dict[str, object], message: str) -> None:
    with pytest.raises(EplbConfigError, match=message):
        EplbConfig(**fields)  # type: ignore[arg-type]  # wrong types on purpose


def test_unknown_policy_is_rejected_listing_known_ones() -> None:
    with pytest.raises(EplbConfigError, match=r"'flashlb'.*known policies: deepseek, default"):
        EplbState(EplbConfig(policy="flashlb"))


def test_an_invalid_device_is_a_config_error() -> None:
    with pytest.raises(EplbConfigError, match="not a torch device"):
        EplbState(EplbConfig(), device="tpu:banana")


def test_vllm_policy_name_resolves_to_the_deepseek_policy() -> None:
    assert EplbState(EplbConfig(policy="default")).policy is DEFAULT_POLICIES.get("deepseek")


# --------------------------------------------------------------------------- registration


def test_initial_maps_are_the_documented_placement_on_every_layer() -> None:
    state = state_for(model())
    live = state.model_state()
    row = list(range(NUM_EXPERTS)) + [i % NUM_EXPERTS for i in range(REDUNDANT)]
    assert live.physical_to_logical_map.dtype == torch.int64
    assert live.physical_to_logical_map.tolist() == [row] * NUM_MOE_LAYERS
    assert torch.equal(live.physical_to_logical_map, initial_placement(3, 8, 12))
    replicas = max_replicas(NUM_EXPERTS, NUM_PHYSICAL)
    assert live.logical_to_physical_map.shape == (NUM_MOE_LAYERS, NUM_EXPERTS, replicas)
    for expert in range(NUM_EXPERTS):
        slots = [p for p, e in enumerate(row) if e == expert]
        assert live.logical_to_physical_map[:, expert, : len(slots)].tolist() == [slots] * 3
        assert bool((live.logical_to_physical_map[:, expert, len(slots) :] == -1).all())
        assert live.logical_replica_count[:, expert].tolist() == [len(slots)] * 3
    assert live.expert_load_pass.dtype == torch.int32
    assert live.expert_load_pass.shape == (NUM_MOE_LAYERS, NUM_PHYSICAL)
    assert live.expert_load_window.shape == (1000, NUM_MOE_LAYERS, NUM_PHYSICAL)
    assert live.expert_load_window.dtype == torch.int32


def test_forward_records_load_into_the_state_handed_to_the_model() -> None:
    target = model()
    state = state_for(target)
    tokens = batch()
    target(tokens)
    load = state.model_state().expert_load_pass
    top_k = target.config.top_k
    assert load.sum(dim=1).tolist() == [tokens.numel() * top_k] * NUM_MOE_LAYERS
    state.step()
    assert state.expert_load_window()[0].sum() == tokens.numel() * top_k * NUM_MOE_LAYERS
    assert int(load.sum()) == 0


def test_layers_route_with_the_updated_maps_after_an_in_place_update() -> None:
    target = model()
    state = state_for(target)
    live = state.model_state()
    target(batch())
    before_physical = live.expert_load_pass.clone()
    before_logical = logical_load(live.physical_to_logical_map, before_physical)
    new_map = shuffled_placement(seed=1)
    state.update_mapping("model", new_map)
    target(batch())
    after_physical = live.expert_load_pass.clone()
    assert not torch.equal(after_physical, before_physical)
    assert torch.equal(logical_load(new_map, after_physical), before_logical)


def test_a_wrapper_without_the_protocol_is_rejected_with_its_report() -> None:
    state = EplbState(EplbConfig(num_redundant_experts=0))
    with pytest.raises(NotMixtureOfExpertsError, match="vlm") as info:
        state.add_model(tiny_vlm(), "vlm")  # type: ignore[arg-type]  # not MoE on purpose
    assert info.value.reports
    assert state.model_names == ()


def test_the_language_model_inside_a_vlm_is_balanced_without_changing_its_outputs() -> None:
    vlm = tiny_vlm(num_redundant_experts=REDUNDANT)
    state = EplbState(EplbConfig(num_redundant_experts=REDUNDANT, step_interval=1))
    state.add_model(vlm.get_language_model(), "vlm.language_model")
    tokens = batch()
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = vlm(tokens, pixels)
    state.update_mapping("vlm.language_model", shuffled_placement(seed=11))
    state.model_state("vlm.language_model").expert_load_pass[:, 3] = 10_000
    state.step()
    assert state.num_rearrangements == 1
    assert torch.equal(vlm(tokens, pixels), expected)


def test_a_model_without_moe_layers_is_not_registered() -> None:
    state = EplbState(EplbConfig(num_redundant_experts=REDUNDANT))
    dense = model(first_k_dense=4)
    with pytest.raises(NotMixtureOfExpertsError):
        state.add_model(dense)
    assert state.model_names == ()


def test_models_that_do_not_fit_the_state_are_rejected_and_not_registered() -> None:
    state = state_for(model())
    with pytest.raises(EplbStateError, match="already registered"):
        state.add_model(model())
    with pytest.raises(EplbConfigError, match="num_redundant_experts=2"):
        state.add_model(model(num_redundant_experts=2), "draft")
    with pytest.raises(EplbStateError, match="num_logical_experts"):
        state.add_model(model(num_experts=4, top_k=1), "draft")
    assert state.model_names == ("model",)


def test_model_sized_for_another_ep_group_is_rejected() -> None:
    state = EplbState(
        EplbConfig(num_redundant_experts=REDUNDANT), ep=ExpertParallelContext(world_size=2, rank=0)
    )
    with pytest.raises(EplbConfigError, match="world_size=2"):
        state.add_model(model())
    assert state.model_names == ()


def test_expert_weights_that_do_not_match_the_counts_undo_the_registration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = model()
    block = target.moe_layers[1]
    wrong = [torch.zeros(NUM_PHYSICAL - 1, 4)]
    monkeypatch.setattr(block, "get_expert_weights", lambda: wrong)  # fault injection
    state = EplbState(EplbConfig(num_redundant_experts=REDUNDANT))
    with pytest.raises(EplbStateError, match=r"expert_weights\[1\]\[0\]"):
        state.add_model(target)
    assert state.model_names == ()


def test_a_draft_model_with_fewer_layers_shares_the_state() -> None:
    main, draft = model(), model(num_layers=2, seed=3)
    state = state_for(main, step_interval=2)
    state.add_model(draft, "draft")
    assert state.model_names == ("model", "draft")
    assert state.model_state("draft").physical_to_logical_map.shape == (1, NUM_PHYSICAL)
    state.step()
    state.step()
    result = state.last_rearrangement
    assert result is not None
    assert set(result.models) == {"model", "draft"}


# --------------------------------------------------------------------------- stepping


def test_window_is_circular_and_the_pass_is_zeroed_each_step() -> None:
    state = state_for(model(), window_size=3, step_interval=100)
    live = state.model_state()
    for k in range(1, 5):
        live.expert_load_pass.fill_(k)
        state.step()
        assert int(live.expert_load_pass.abs().sum()) == 0
    window = state.expert_load_window()
    assert [int(window[i, 0, 0]) for i in range(3)] == [4, 2, 3]
    assert state.window_step == 1
    assert state.step_counter == 4


def test_dummy_steps_advance_the_counter_but_record_nothing() -> None:
    state = state_for(model(), window_size=4, step_interval=100)
    live = state.model_state()
    live.expert_load_pass.fill_(9)
    state.step(is_dummy=True)
    assert int(live.expert_load_pass.sum()) == 0
    assert int(live.expert_load_window.sum()) == 0
    assert state.window_step == 0
    assert state.step_counter == 1


def test_profile_steps_change_nothing() -> None:
    state = state_for(model(), window_size=4, step_interval=1)
    state.model_state().expert_load_pass.fill_(3)
    before = snapshot(state)
    state.step(is_profile=True)
    assert_unchanged(state, before)
    assert state.step_counter == 0
    assert state.num_rearrangements == 0


def test_rearrangement_happens_exactly_at_step_interval_counting_dummy_steps() -> None:
    state = state_for(model(), window_size=8, step_interval=5)
    for _ in range(2):
        state.step(is_dummy=True)
    for _ in range(2):
        state.step()
    assert state.num_rearrangements == 0
    assert state.steps_until_rearrangement == 1
    state.step()
    assert state.num_rearrangements == 1
    assert state.step_counter == 0
    for _ in range(5):
        state.step()
    assert state.num_rearrangements == 2


def test_step_before_registration_is_an_error() -> None:
    with pytest.raises(EplbStateError, match="before any model"):
        EplbState(EplbConfig()).step()


def test_log_stats_logs_balancedness_every_interval(caplog: pytest.LogCaptureFixture) -> None:
    state = state_for(model(), step_interval=100, log_balancedness_interval=2)
    caplog.set_level(logging.INFO, logger="moe_protocols.eplb")
    for _ in range(4):
        state.model_state().expert_load_pass.fill_(1)
        state.step(log_stats=True)
    records = [r for r in caplog.records if r.name == "moe_protocols.eplb"]
    assert len(records) == 2
    assert "balancedness=1.0000" in records[0].getMessage()
    assert "avg_tokens=36.00" in records[0].getMessage()  # 3 layers x 12 slots x 1


def test_balancedness_stats_describe_the_window() -> None:
    target = model()
    state = state_for(target, step_interval=100)
    target(batch())
    state.step()
    stats = state.balancedness()
    assert stats.rank_load.shape == (NUM_MOE_LAYERS, 1)
    assert stats.total_load == batch().numel() * target.config.top_k * NUM_MOE_LAYERS
    assert stats.per_layer.tolist() == [1.0] * NUM_MOE_LAYERS  # one rank is always balanced
    assert stats.overall == stats.token_weighted == 1.0


def test_accessors_return_copies_and_model_state_the_live_tensors() -> None:
    state = state_for(model())
    copy = state.physical_to_logical_map()
    copy.fill_(0)
    live = state.model_state().physical_to_logical_map
    assert live[0, 1] == 1
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        state.model_state().physical_to_logical_map = copy  # type: ignore[misc]  # frozen on purpose
    with pytest.raises(EplbStateError, match="'draft'"):
        state.model_state("draft")


# --------------------------------------------------------------------------- rearranging


def test_rearrangement_on_skewed_load_replicates_the_hot_experts() -> None:
    state = state_for(model(), step_interval=1)
    skew(state, {7: 4000, 6: 2000})
    live = state.model_state()
    load = logical_load(live.physical_to_logical_map, live.expert_load_pass)
    before = per_slot_balancedness(live.physical_to_logical_map, load)
    state.step()
    result = state.last_rearrangement
    assert result is not None
    after = per_slot_balancedness(live.physical_to_logical_map, load)
    assert after > before
    assert (live.logical_replica_count[:, 7] > 1).all()
    assert (live.logical_replica_count[:, 6] > 1).all()
    changed = result["model"]
    assert changed.slots_changed > 0
    assert changed.bytes_moved > 0
    assert changed.balancedness_before.shape == (NUM_MOE_LAYERS,)
    assert torch.equal(changed.new_physical_to_logical_map, live.physical_to_logical_map)
    assert int(live.expert_load_window.sum()) == 0  # the window restarts under the new placement


def test_logits_are_identical_after_moving_experts_and_replicas() -> None:
    target = model()
    state = state_for(target, step_interval=1)
    tokens = batch()
    expected = target(tokens)
    skew(state, {5: 3000, 2: 1500})
    state.step()
    result = state.last_rearrangement
    assert result is not None
    assert result.slots_changed > 0
    assert torch.equal(target(tokens), expected)
    before = state.physical_to_logical_map()
    state.update_mapping("model", shuffled_placement(seed=2))
    primary_moved = (
        state.physical_to_logical_map()[:, :NUM_EXPERTS] != before[:, :NUM_EXPERTS]
    ).any()
    assert bool(primary_moved)
    assert torch.equal(target(tokens), expected)


def test_every_slot_holds_its_logical_experts_original_weights_after_a_move() -> None:
    target = model()
    state = state_for(target, step_interval=1)
    originals = [[w[:NUM_EXPERTS].clone() for w in layer] for layer in target.expert_weights]
    skew(state, {1: 5000, 3: 800})
    state.step()
    state.update_mapping("model", shuffled_placement(seed=4))
    p2l = state.physical_to_logical_map()
    for layer, weights in enumerate(target.expert_weights):
        for k, w in enumerate(weights):
            assert torch.equal(w, originals[layer][k][p2l[layer]])


def test_maps_are_committed_in_place() -> None:
    state = state_for(model(), step_interval=1)
    live = state.model_state()
    tensors = [
        live.physical_to_logical_map,
        live.logical_to_physical_map,
        live.logical_replica_count,
        live.expert_load_pass,
        live.expert_load_window,
    ]
    pointers = [t.data_ptr() for t in tensors]
    skew(state, {0: 9000})
    state.step()
    state.update_mapping("model", shuffled_placement(seed=5))
    assert state.model_state() is live
    assert [t.data_ptr() for t in tensors] == pointers
    l2p, count = compute_logical_maps(live.physical_to_logical_map, NUM_EXPERTS, live.max_replicas)
    assert torch.equal(live.logical_to_physical_map, l2p)
    assert torch.equal(live.logical_replica_count, count)


def test_a_failure_mid_transfer_leaves_weights_maps_and_window_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policies = PolicyRegistry().with_policy(ShiftPolicy())
    target = model()
    state = EplbState(
        EplbConfig(num_redundant_experts=REDUNDANT, policy="shift"), policies=policies
    )
    state.add_model(target)
    state.model_state().expert_load_pass.fill_(2)
    state.step()
    before = snapshot(state)
    real = _transfer._stage_layer

    def failing(
        plan: _transfer.LayerTransferPlan, weights: Sequence[torch.Tensor]
    ) -> _transfer._StagedLayer:
        if plan.layer == 1:
            raise RuntimeError("injected copy failure")
        return real(plan, weights)

    monkeypatch.setattr(_transfer, "_stage_layer", failing)
    with pytest.raises(TransferError, match="layer 1") as info:
        state.rearrange()
    assert info.value.layer == 1
    assert_unchanged(state, before)
    assert state.last_rearrangement is None
    monkeypatch.setattr(_transfer, "_stage_layer", real)
    # Rotating [0..7, 0..3] by one slot changes every slot of every layer.
    assert state.rearrange().slots_changed == NUM_MOE_LAYERS * NUM_PHYSICAL


@pytest.mark.parametrize(
    ("policy", "message"),
    [(BrokenPolicy(), "logical expert 0 has no replica"), (CrashingPolicy(), "policy bug")],
)
def test_a_bad_policy_result_changes_nothing(policy: BrokenPolicy, message: str) -> None:
    policies = PolicyRegistry().with_policy(policy)
    state = EplbState(
        EplbConfig(num_redundant_experts=REDUNDANT, policy=policy.name), policies=policies
    )
    state.add_model(model())
    state.model_state().expert_load_pass.fill_(1)
    state.step()
    before = snapshot(state)
    with pytest.raises(PolicyError, match=message):
        state.rearrange()
    assert_unchanged(state, before)


# --------------------------------------------------------------------------- restoring placements

GOOD = initial_placement(NUM_MOE_LAYERS, NUM_EXPERTS, NUM_PHYSICAL)


def _with(layer: int, slot: int, value: int) -> torch.Tensor:
    bad = GOOD.clone()
    bad[layer, slot] = value
    return bad


BAD_MAPPINGS: dict[str, tuple[object, str]] = {
    "1-D": (GOOD[0], "2 dimensions"),
    "3-D": (GOOD.unsqueeze(0), "2 dimensions"),
    "too few layers": (GOOD[:2], "has 2 layers, expected 3"),
    "too many layers": (torch.cat([GOOD, GOOD[:1]]), "has 4 layers, expected 3"),
    "too few slots": (GOOD[:, :10], "has 10 physical slots, expected 12"),
    "too many slots": (torch.cat([GOOD, GOOD[:, :4]], dim=1), "has 16 physical slots"),
    "no layers": (GOOD[:0], "no layers"),
    "float": (GOOD.double(), "integer dtype"),
    "bool": (GOOD.bool(), "integer dtype"),
    "complex": (GOOD.to(torch.complex64), "integer dtype"),
    "id too large": (_with(2, 11, 8), "layer 2, slot 11 holds 8"),
    "negative id": (_with(0, 3, -1), "layer 0, slot 3 holds -1"),
    "missing expert": (_with(1, 7, 0), "layer 1, logical expert 7 has no replica"),
    "nested list": (GOOD.tolist(), "expected a torch.Tensor"),
    "None": (None, "expected a torch.Tensor"),
    "placement for other experts": (
        Placement(physical_to_logical_map=GOOD.clamp(max=5), num_logical_experts=6),
        "made for 6 logical experts",
    ),
    "placement for other ranks": (
        Placement(physical_to_logical_map=GOOD, num_logical_experts=8, num_ranks=2),
        "made for 2 EP ranks",
    ),
    "placement of another shape": (
        Placement(physical_to_logical_map=GOOD[:, :8], num_logical_experts=8),
        "has 8 physical slots",
    ),
    "meta tensor": (torch.empty(3, 12, dtype=torch.int64, device="meta"), "dense tensor with data"),
    "sparse": (GOOD.to_sparse(), "dense tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD_MAPPINGS))
def test_malformed_mappings_are_rejected_and_change_nothing(case: str) -> None:
    mapping, message = BAD_MAPPINGS[case]
    target = model()
    state = state_for(target, step_interval=100)
    target(batch())
    state.update_mapping("model", shuffled_placement(seed=6))
    target(batch())
    before = snapshot(state)
    with pytest.raises(MappingError, match=message) as info:
        state.update_mapping("model", mapping)  # type: ignore[arg-type]  # malformed on purpose
    assert "'model'" in str(info.value)
    assert_unchanged(state, before)


def test_update_mapping_of_an_unknown_model_is_an_error() -> None:
    state = state_for(model())
    with pytest.raises(EplbStateError, match="'draft'"):
        state.update_mapping("draft", GOOD)


def test_update_mapping_clears_the_load_it_recorded_under_the_old_placement() -> None:
    state = state_for(model(), step_interval=100)
    state.model_state().expert_load_pass.fill_(1)
    state.step()
    state.model_state().expert_load_pass.fill_(1)
    state.update_mapping("model", shuffled_placement(seed=8))
    assert int(state.model_state().expert_load_pass.sum()) == 0
    assert int(state.model_state().expert_load_window.sum()) == 0


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_a_saved_placement_restores_a_fresh_model_exactly(tmp_path: Path, suffix: str) -> None:
    served = model()
    state = state_for(served, step_interval=1)
    skew(state, {4: 7000, 0: 3000})
    state.step()
    state.update_mapping("model", shuffled_placement(seed=9))
    path = tmp_path / f"placement{suffix}"
    state.save_placement(path)

    fresh = model()
    tokens = batch()
    expected = fresh(tokens)
    restored = EplbState.from_mapping(
        fresh, EplbConfig(num_redundant_experts=REDUNDANT), load_placement(path)
    )
    assert torch.equal(restored.physical_to_logical_map(), state.physical_to_logical_map())
    assert torch.equal(restored.logical_to_physical_map(), state.logical_to_physical_map())
    for mine, theirs in zip(fresh.expert_weights, served.expert_weights, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    assert torch.equal(fresh(tokens), expected)
    assert load_placement(path).metadata["model_name"] == "model"


def test_from_mapping_takes_the_options_the_constructor_takes() -> None:
    options = TransferOptions(buffer_bytes=1 << 20)
    restored = EplbState.from_mapping(
        model(),
        EplbConfig(num_redundant_experts=REDUNDANT),
        GOOD,
        transfer=options,
        integrity="full",
    )
    assert restored.transfer_options is options
    assert restored.integrity == "full"
    assert torch.equal(restored.physical_to_logical_map(), GOOD)
    with pytest.raises(EplbConfigError, match="integrity must be one of"):
        EplbState.from_mapping(
            model(),
            EplbConfig(num_redundant_experts=REDUNDANT),
            GOOD,
            integrity="most",  # type: ignore[arg-type]  # a caller without a checker
        )


def test_from_mapping_rejects_a_bad_placement() -> None:
    with pytest.raises(MappingError, match="slot 0 holds 99"):
        EplbState.from_mapping(
            model(), EplbConfig(num_redundant_experts=REDUNDANT), _with(0, 0, 99)
        )
