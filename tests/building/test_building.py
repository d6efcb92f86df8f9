"""The building blocks: routing, the grouped SwiGLU compute, the experts container, the mixin."""

from __future__ import annotations

import copy
import re
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx

from moe_protocols import EplbConfig, EplbState, is_mixture_of_experts, is_moe_layer
from moe_protocols.building import (
    MoEModelMixin,
    StackedExperts,
    SwiGLUExperts,
    route_to_physical,
    swiglu_experts,
)
from moe_protocols.conformance import check_conformance
from moe_protocols.eplb._maps import compute_logical_maps
from moe_protocols.errors import (
    CheckpointError,
    EplbConfigError,
    EplbStateError,
    MappingError,
    ModelInputError,
)
from moe_protocols.parallel import ExpertParallelContext
from moe_protocols.protocols import COUNT_MEMBERS

HIDDEN, INTER, EXPERTS = 16, 24, 4


class Expert(nn.Module):
    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=bias)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=bias)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


def experts_list(seed: int = 0, bias: bool = False) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList(Expert(bias) for _ in range(EXPERTS))


def maps_of(placement: list[int], num_logical: int = EXPERTS) -> tuple[Tensor, Tensor]:
    """This layer's ``(logical_to_physical [E, R], replica_count [E])`` of a placement."""
    p2l = torch.tensor([placement])
    l2p, count = compute_logical_maps(p2l, num_logical, len(placement) - num_logical + 1)
    return l2p[0], count[0]


def reference_moe(experts: nn.ModuleList, hidden: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(ids.shape[1]):
            out[t] += weights[t, k] * experts[int(ids[t, k])](hidden[t])
    return out


# ---------------------------------------------------------------- route_to_physical


def test_routing_spreads_tokens_over_replicas_and_records_each_pair_at_its_slot() -> None:
    # Expert 0 has replicas in slots 0 and 4, expert 1 in 1 and 5.
    l2p, count = maps_of([0, 1, 2, 3, 0, 1])
    ids = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 0]])
    load = torch.zeros(6, dtype=torch.int64)
    physical = route_to_physical(ids, l2p, count, load)
    # Token t takes replica t % count of each expert it chose.
    assert physical.tolist() == [[0, 1], [4, 2], [0, 3], [5, 4]]
    assert load.tolist() == [2, 1, 1, 1, 2, 1]
    assert physical.dtype == torch.int64


def test_routing_counts_only_the_given_slots_when_every_rank_sees_every_token() -> None:
    l2p, count = maps_of([0, 1, 2, 3, 0, 1])
    ids = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 0]])
    first, second = torch.zeros(6, dtype=torch.int64), torch.zeros(6, dtype=torch.int64)
    route_to_physical(ids, l2p, count, first, count_slots=(0, 3))
    route_to_physical(ids, l2p, count, second, count_slots=(3, 6))
    assert (first + second).tolist() == [2, 1, 1, 1, 2, 1]
    assert first[3:].sum() == 0
    assert second[:3].sum() == 0


def test_routing_with_dispatch_shares_sends_each_replica_its_share_and_records_it() -> None:
    from moe_protocols.eplb import replica_shares

    # Expert 0 has replicas in slots 0 (rank 0) and 4 (rank 2); its 6 choices are split by the
    # step's load: rank 0 also serves expert 1's 4 choices, so slot 4 should take more of them.
    # The position rule splits them 3/3: rank loads 7, 2, 3; the optimum is 5, 2, 5.
    placement = [0, 1, 2, 3, 0, 2]
    l2p, count = maps_of(placement)
    ids = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1], [0, 3], [0, 3]])
    counts = torch.zeros(4)
    counts.index_add_(0, ids.reshape(-1), torch.ones(ids.numel()))
    shares = replica_shares(
        l2p.unsqueeze(0), count.unsqueeze(0), counts.unsqueeze(0), num_physical=6, num_ranks=3
    )[0]
    load = torch.zeros(6, dtype=torch.int64)
    physical = route_to_physical(ids, l2p, count, load, shares=shares)
    slot_expert = torch.tensor(placement)
    assert torch.equal(slot_expert[physical], ids)  # every pair lands on a slot of its expert
    assert torch.equal(load, torch.bincount(physical.reshape(-1), minlength=6))
    rank_load = load.view(3, 2).sum(dim=1)
    modulo = torch.zeros(6, dtype=torch.int64)
    route_to_physical(ids, l2p, count, modulo)
    assert modulo.view(3, 2).sum(dim=1).tolist() == [7, 2, 3]
    assert rank_load.tolist() == [5, 2, 5]  # the step's optimum


def test_routing_follows_maps_rewritten_in_place() -> None:
    l2p, count = maps_of([0, 1, 2, 3, 0, 1])
    ids = torch.tensor([[2, 3]])
    before = route_to_physical(ids, l2p, count)
    new_l2p, new_count = maps_of([3, 2, 1, 0, 2, 2])
    l2p.copy_(new_l2p)
    count.copy_(new_count)
    assert before.tolist() == [[2, 3]]
    assert route_to_physical(ids, l2p, count).tolist() == [[1, 0]]


def test_routing_and_grouped_compute_trace_without_host_syncs() -> None:
    """Fake-tensor tracing fails on any data-dependent shape or host read (.item(), bool())."""
    l2p, count = maps_of([0, 1, 2, 3, 0, 1])
    ids = torch.tensor([[0, 1], [0, 2], [3, 1]])
    load = torch.zeros(6, dtype=torch.int64)

    def route(ids: Tensor, l2p: Tensor, count: Tensor, load: Tensor) -> Tensor:
        return route_to_physical(ids, l2p, count, load, count_slots=(0, 3))

    make_fx(route, tracing_mode="fake")(ids, l2p, count, load)
    # bfloat16 off the CPU takes the grouped-mm path, the one CUDA graphs capture; the
    # meta device stands in for CUDA here.
    meta: dict[str, Any] = {"dtype": torch.bfloat16, "device": "meta"}
    graph = make_fx(swiglu_experts, tracing_mode="fake")(
        torch.empty(3, HIDDEN, **meta),
        ids.to("meta"),
        torch.empty(3, 2, device="meta"),
        torch.empty(6, INTER, HIDDEN, **meta),
        torch.empty(6, INTER, HIDDEN, **meta),
        torch.empty(6, HIDDEN, INTER, **meta),
    )
    assert sum("grouped_mm" in str(node.target) for node in graph.graph.nodes) == 3

    def syncs(ids: Tensor, l2p: Tensor, count: Tensor, load: Tensor) -> Tensor:
        physical = route(ids, l2p, count, load)
        if bool((physical < 0).any()):  # the kind of check the blocks leave out
            raise AssertionError
        return physical

    with pytest.raises(Exception, match=r"data.dependent|DataDependent"):
        make_fx(syncs, tracing_mode="fake")(ids, l2p, count, load)


# ---------------------------------------------------------------- swiglu_experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_swiglu_equals_computing_every_pair_on_its_own(dtype: torch.dtype) -> None:
    experts = experts_list().to(dtype)
    stacked = SwiGLUExperts.from_module_list(experts).to(dtype)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, HIDDEN, generator=generator, dtype=dtype)
    ids = torch.randint(0, EXPERTS, (37, 2), generator=generator)
    weights = torch.rand(37, 2, generator=generator, dtype=dtype)
    with torch.no_grad():
        out = swiglu_experts(
            hidden,
            ids,
            weights,
            stacked.stacked("gate_proj"),
            stacked.stacked("up_proj"),
            stacked.stacked("down_proj"),
        )
        want = reference_moe(experts, hidden, ids, weights)
    torch.testing.assert_close(out, want)


def test_pairs_served_on_another_rank_contribute_nothing() -> None:
    experts = experts_list()
    stacked = SwiGLUExperts.from_module_list(experts)
    hidden, weights = torch.randn(5, HIDDEN), torch.rand(5, 2)
    ids = torch.tensor([[0, 1], [2, 3], [1, 1], [3, 0], [2, 2]])
    elsewhere = ids.clone()
    elsewhere[:, 1] = -1
    args = (stacked.stacked(n) for n in ("gate_proj", "up_proj", "down_proj"))
    with torch.no_grad():
        out = swiglu_experts(hidden, elsewhere, weights, *args)
        want = reference_moe(experts, hidden, ids[:, :1], weights[:, :1])
    torch.testing.assert_close(out, want)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    tokens=st.integers(1, 40),
    redundant=st.integers(0, 4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_outputs_are_bit_identical_wherever_the_experts_live(
    seed: int, tokens: int, redundant: int, dtype: torch.dtype
) -> None:
    """Any placement of the same experts (replicas included) computes the same bits."""
    generator = torch.Generator().manual_seed(seed)
    physical = EXPERTS + redundant
    extra = torch.randint(0, EXPERTS, (redundant,), generator=generator).tolist()
    placement = [int(e) for e in torch.randperm(EXPERTS, generator=generator)] + extra
    experts = experts_list(seed % 7).to(dtype)
    layer = SwiGLUExperts.from_module_list(experts, num_redundant_experts=redundant)
    hidden = torch.randn(tokens, HIDDEN, generator=generator).to(dtype)
    ids = torch.rand(tokens, EXPERTS, generator=generator).topk(2, dim=-1).indices
    weights = torch.rand(tokens, 2, generator=generator).to(dtype)
    with torch.no_grad():
        before = layer(hidden, ids, weights)
        # Move every expert to its slot in the new placement, then hand over its maps.
        logical = {n: layer.stacked(n)[:EXPERTS].clone() for n in layer.weight_names}
        for n in layer.weight_names:
            layer.stacked(n).copy_(logical[n][torch.tensor(placement)])
        l2p, count = maps_of(placement)
        load = torch.zeros(1, physical, dtype=torch.int64)
        layer.set_eplb_state(0, load, l2p.unsqueeze(0), count.unsqueeze(0))
        after = layer(hidden, ids, weights)
    assert torch.equal(before, after)
    assert int(load.sum()) == tokens * 2


# ---------------------------------------------------------------- StackedExperts


def test_redundant_slots_start_as_replicas_and_weights_are_live_views() -> None:
    layer = SwiGLUExperts.from_module_list(experts_list(), num_redundant_experts=3)
    assert is_moe_layer(cast(object, layer))  # object: the guard would narrow layer's type
    assert layer.local_logical_experts() == [0, 1, 2, 3, 0, 1, 2]
    weights = layer.get_expert_weights()
    assert [tuple(w.shape) for w in weights] == [(7, INTER, HIDDEN)] * 2 + [(7, HIDDEN, INTER)]
    for w in weights:
        assert torch.equal(w[4:], w[:3])
    weights[0][6].zero_()  # EPLB writes rows of these tensors to move experts
    assert int(layer.stacked("gate_proj")[6].abs().sum()) == 0


def test_each_ep_rank_holds_its_share_of_the_slots() -> None:
    experts = experts_list()
    ranks = [
        StackedExperts.from_module_list(
            experts,
            num_redundant_experts=2,
            ep=ExpertParallelContext(world_size=2, rank=rank),
        )
        for rank in range(2)
    ]
    assert [r.local_logical_experts() for r in ranks] == [[0, 1, 2], [3, 0, 1]]
    assert ranks[1].weight_names == ("gate_proj_weight", "up_proj_weight", "down_proj_weight")
    assert torch.equal(ranks[1].stacked("up_proj_weight")[1], cast(Any, experts[0]).up_proj.weight)
    physical = torch.tensor([[0, 3], [5, 2]])
    assert ranks[1].local_slots(physical).tolist() == [[-1, 0], [2, -1]]


def test_replicas_on_one_rank_are_computed_as_one_group() -> None:
    """A pair is computed by its expert's first local replica; the load still names its slot."""
    # 6 slots on 2 ranks; rank 1 holds expert 3 twice (slots 3 and 4) and expert 0 (slot 5).
    l2p, count = maps_of([0, 1, 2, 3, 3, 0])
    ranks = []
    for rank in range(2):
        layer = StackedExperts.from_module_list(
            experts_list(),
            num_redundant_experts=2,
            ep=ExpertParallelContext(world_size=2, rank=rank),
        )
        layer.set_eplb_state(
            0, torch.zeros(1, 6, dtype=torch.int64), l2p.unsqueeze(0), count.unsqueeze(0)
        )
        ranks.append(layer)
    ids = torch.tensor([[3, 0], [3, 0], [1, 2]])
    physical = ranks[1].route(ids)
    assert physical.tolist() == [[3, 0], [4, 5], [1, 2]]  # token t takes replica t % count
    assert ranks[1].compute_slots(ids, physical).tolist() == [[0, -1], [0, 2], [-1, -1]]
    assert ranks[0].compute_slots(ids, physical).tolist() == [[-1, 0], [-1, -1], [1, 2]]
    single = StackedExperts.from_module_list(experts_list(), num_redundant_experts=2)
    single.set_eplb_state(
        0, torch.zeros(1, 6, dtype=torch.int64), l2p.unsqueeze(0), count.unsqueeze(0)
    )
    assert single.compute_slots(ids, single.route(ids)).tolist() == [[3, 0], [3, 0], [1, 2]]


def test_the_container_keeps_the_eplb_views_it_is_handed() -> None:
    layer = SwiGLUExperts.from_module_list(experts_list(), num_redundant_experts=2, top_k=2)
    load = torch.zeros(3, 6, dtype=torch.int64)
    l2p, count = maps_of([0, 1, 2, 3, 0, 1])
    layer.set_eplb_state(2, load, l2p.expand(3, -1, -1).clone(), count.expand(3, -1).clone())
    hidden, ids, weights = torch.randn(4, HIDDEN), torch.tensor([[0, 1]] * 4), torch.rand(4, 2)
    with torch.no_grad():
        layer(hidden, ids, weights)
    assert load[2].tolist() == [2, 2, 0, 0, 2, 2]
    assert load[:2].sum() == 0
    layer.record_expert_load = False
    with torch.no_grad():
        layer(hidden, ids, weights)
    assert int(load.sum()) == 8


def test_bad_eplb_tensors_are_refused_and_the_old_views_kept() -> None:
    layer = SwiGLUExperts.from_module_list(experts_list(), num_redundant_experts=2)
    load = torch.zeros(1, 6, dtype=torch.int64)
    l2p, count = maps_of([0, 1, 2, 3, 0, 1])
    layer.set_eplb_state(0, load, l2p.unsqueeze(0), count.unsqueeze(0))
    with pytest.raises(EplbStateError, match="expert_load_view must be a \\[moe_layers, 6\\]"):
        layer.set_eplb_state(0, torch.zeros(1, 5), l2p.unsqueeze(0), count.unsqueeze(0))
    with pytest.raises(MappingError, match="logical_to_physical_map"):
        layer.set_eplb_state(0, load, l2p, count.unsqueeze(0))
    zero = count.clone()
    zero[1] = 0
    with pytest.raises(MappingError, match="replica count outside \\[1, 3\\]"):
        layer.set_eplb_state(0, load, l2p.unsqueeze(0), zero.unsqueeze(0))
    far = l2p.clone()
    far[2, 0] = 6
    with pytest.raises(MappingError, match="slot outside \\[0, 6\\)"):
        layer.set_eplb_state(0, load, far.unsqueeze(0), count.unsqueeze(0))
    with torch.no_grad():
        layer(torch.randn(2, HIDDEN), torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2))
    assert int(load.sum()) == 4  # still recording into the first views


@pytest.mark.parametrize(
    ("weights", "kwargs", "message"),
    [
        ({}, {}, "non-empty mapping"),
        ({"w.1": torch.zeros(4, 2)}, {}, "must be identifiers"),
        ({"w": torch.zeros(0, 2)}, {}, "at least one expert"),
        ({"w": "not a tensor"}, {}, "must be a \\[logical_experts, ...\\] tensor"),
        ({"a": torch.zeros(4, 2), "b": torch.zeros(3, 2)}, {}, "disagree on the number"),
        ({"w": torch.zeros(4, 2)}, {"num_redundant_experts": -1}, "num_redundant_experts"),
        ({"w": torch.zeros(4, 2)}, {"num_redundant_experts": True}, "num_redundant_experts"),
        ({"w": torch.zeros(4, 2)}, {"top_k": 0}, "top_k must be an int >= 1"),
        (
            {"w": torch.zeros(4, 2)},
            {"num_redundant_experts": 1, "ep": ExpertParallelContext(world_size=2, rank=0)},
            "do not split evenly over 2 EP ranks",
        ),
    ],
)
def test_unusable_weights_are_rejected_by_name(
    weights: dict[str, object], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(EplbConfigError, match=message):
        StackedExperts(weights, **kwargs)  # type: ignore[arg-type]  # malformed on purpose


def test_swiglu_needs_its_three_weights_in_linear_layout() -> None:
    with pytest.raises(EplbConfigError, match="exactly the weights gate_proj, up_proj"):
        SwiGLUExperts({"w1": torch.zeros(4, 8, 6)})
    bad = {
        "gate_proj": torch.zeros(4, 8, 6),
        "up_proj": torch.zeros(4, 8, 6),
        "down_proj": torch.zeros(4, 8, 6),
    }
    with pytest.raises(EplbConfigError, match="down_proj \\[experts, hidden, intermediate\\]"):
        SwiGLUExperts(bad)


def test_from_module_list_refuses_experts_it_would_change() -> None:
    with pytest.raises(
        EplbConfigError,
        match=re.escape("has tensors ['down_proj.bias', 'gate_proj.bias', 'up_proj.bias']"),
    ):
        SwiGLUExperts.from_module_list(experts_list(bias=True))
    mixed = experts_list()
    mixed[2].up_proj = nn.Linear(HIDDEN, INTER + 1, bias=False)
    with pytest.raises(EplbConfigError, match=re.escape("'up_proj.weight' differs in shape")):
        SwiGLUExperts.from_module_list(mixed)
    with pytest.raises(EplbConfigError, match="non-empty list of per-expert modules"):
        SwiGLUExperts.from_module_list([])
    with pytest.raises(EplbConfigError, match=re.escape("lacks ['w3.weight']")):
        SwiGLUExperts.from_module_list(
            experts_list(),
            {
                "gate_proj": "gate_proj.weight",
                "up_proj": "w3.weight",
                "down_proj": "down_proj.weight",
            },
        )


def test_forward_refuses_inputs_of_the_wrong_shape() -> None:
    layer = SwiGLUExperts.from_module_list(experts_list(), top_k=2)
    with pytest.raises(ModelInputError, match="logical_ids must be \\[tokens, top_k=2\\]"):
        layer(torch.randn(3, HIDDEN), torch.zeros(3, 1, dtype=torch.int64), torch.rand(3, 1))
    with pytest.raises(ModelInputError, match="one row per row of logical_ids"):
        layer(torch.randn(3, HIDDEN), torch.zeros(2, 2, dtype=torch.int64), torch.rand(2, 2))


# ---------------------------------------------------------------- checkpoint keys


def test_state_dict_keys_and_values_are_the_plain_module_lists() -> None:
    plain = experts_list()
    layer = SwiGLUExperts.from_module_list(plain, num_redundant_experts=2)
    saved, want = layer.state_dict(), plain.state_dict()
    assert list(saved) == list(want)
    assert all(torch.equal(saved[k], want[k]) for k in want)


def test_a_plain_checkpoint_fills_every_slot_under_the_current_placement() -> None:
    checkpoint = experts_list(seed=5).state_dict()
    layer = SwiGLUExperts.from_module_list(experts_list(seed=1), num_redundant_experts=2)
    placement = [3, 1, 0, 2, 3, 3]
    l2p, count = maps_of(placement)
    layer.set_eplb_state(0, torch.zeros(1, 6), l2p.unsqueeze(0), count.unsqueeze(0))
    assert layer.load_state_dict(checkpoint).missing_keys == []
    for slot, expert in enumerate(placement):
        assert torch.equal(
            layer.stacked("down_proj")[slot], checkpoint[f"{expert}.down_proj.weight"]
        )
    # And saving after the move gives every logical expert back under its own key.
    assert all(torch.equal(v, checkpoint[k]) for k, v in layer.state_dict().items())


def test_incomplete_or_misshapen_checkpoints_are_refused_and_change_nothing() -> None:
    layer = SwiGLUExperts.from_module_list(experts_list(), num_redundant_experts=2)
    before = copy.deepcopy(layer.state_dict())
    partial = experts_list(seed=3).state_dict()
    del partial["2.up_proj.weight"]
    with pytest.raises(CheckpointError, match="lacks those of logical experts \\[2\\]"):
        layer.load_state_dict(partial)
    misshapen = experts_list(seed=3).state_dict()
    misshapen["1.gate_proj.weight"] = torch.zeros(INTER, HIDDEN + 1)
    with pytest.raises(CheckpointError, match=re.escape("'1.gate_proj.weight' has shape (24, 17)")):
        layer.load_state_dict(misshapen)
    after = layer.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


@settings(max_examples=30, deadline=None)
@given(
    dropped=st.sets(st.integers(0, 3 * EXPERTS - 1), max_size=3),  # never a whole weight
    widened=st.sets(st.integers(0, 3 * EXPERTS - 1), max_size=2),
)
def test_a_damaged_checkpoint_loads_whole_or_not_at_all(
    dropped: set[int], widened: set[int]
) -> None:
    layer = SwiGLUExperts.from_module_list(experts_list(), num_redundant_experts=2)
    before = {n: layer.stacked(n).detach().clone() for n in layer.weight_names}
    checkpoint = experts_list(seed=9).state_dict()
    keys = list(checkpoint)
    for index in widened:
        checkpoint[keys[index]] = torch.zeros(*checkpoint[keys[index]].shape, 2)
    for index in dropped:
        del checkpoint[keys[index]]
    damaged = bool(dropped or widened)
    try:
        layer.load_state_dict(checkpoint)
    except CheckpointError:
        assert damaged
        assert all(torch.equal(layer.stacked(n), before[n]) for n in layer.weight_names)
    else:
        assert not damaged
        for slot, expert in enumerate(layer.local_logical_experts()):
            want = checkpoint[f"{expert}.up_proj.weight"]
            assert torch.equal(layer.stacked("up_proj")[slot], want)


def test_missing_experts_are_reported_under_their_per_expert_keys() -> None:
    layer = SwiGLUExperts.from_module_list(experts_list(), num_redundant_experts=2)
    result = layer.load_state_dict({}, strict=False)
    assert sorted(result.missing_keys) == sorted(experts_list().state_dict())
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*0\.gate_proj\.weight"):
        layer.load_state_dict({})


def test_each_ep_rank_saves_and_loads_the_experts_it_holds() -> None:
    checkpoint = experts_list(seed=2).state_dict()
    rank1 = SwiGLUExperts.from_module_list(
        experts_list(), num_redundant_experts=2, ep=ExpertParallelContext(world_size=2, rank=1)
    )
    rank1.load_state_dict(checkpoint)
    saved = rank1.state_dict()
    assert sorted({k.split(".")[0] for k in saved}) == ["0", "1", "3"]
    assert all(torch.equal(v, checkpoint[k]) for k, v in saved.items())


# ---------------------------------------------------------------- MoEModelMixin


class AuthorModel(nn.Module, MoEModelMixin):
    def __init__(self, layers: list[SwiGLUExperts], **kwargs: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(layers)
        self.init_moe_layers(layers, **kwargs)


def swiglu(redundant: int = 2, **kwargs: object) -> SwiGLUExperts:
    return SwiGLUExperts.from_module_list(experts_list(), num_redundant_experts=redundant, **kwargs)  # type: ignore[arg-type]  # test helper forwards keywords


def test_the_mixin_derives_every_count_from_the_layers() -> None:
    model = AuthorModel([swiglu(), swiglu()], num_shared_experts=1, num_expert_groups=2)
    assert is_mixture_of_experts(model)
    assert check_conformance(model).ok
    counts = {name: getattr(model, name) for name in COUNT_MEMBERS}
    assert counts == {
        "num_moe_layers": 2,
        "num_expert_groups": 2,
        "num_logical_experts": 4,
        "num_physical_experts": 6,
        "num_local_physical_experts": 6,
        "num_routed_experts": 4,
        "num_shared_experts": 1,
        "num_redundant_experts": 2,
    }
    state = EplbState(EplbConfig(num_redundant_experts=2))
    state.add_model(model)
    assert [len(w) for w in model.expert_weights] == [3, 3]


def test_layers_that_disagree_or_do_not_conform_are_named_and_nothing_is_set() -> None:
    with pytest.raises(EplbConfigError, match="layers\\[1\\] has \\(4, 5, 5\\)"):
        AuthorModel([swiglu(2), swiglu(1)])
    model = nn.Module()
    with pytest.raises(
        EplbConfigError, match="layers\\[0\\] \\(Linear\\) is not an ElasticMoELayer"
    ):
        MoEModelMixin.init_moe_layers(model, [nn.Linear(2, 2)])  # type: ignore[arg-type]  # a plain module as self
    assert not hasattr(model, "num_moe_layers")
    with pytest.raises(EplbConfigError, match="do not split into num_expert_groups=3"):
        AuthorModel([swiglu()], num_expert_groups=3)
    with pytest.raises(EplbConfigError, match="num_shared_experts must be an int >= 0"):
        AuthorModel([swiglu()], num_shared_experts=-1)


def test_a_stage_without_moe_layers_is_dense() -> None:
    model = AuthorModel([])
    assert model.num_moe_layers == 0
    # object: the guard's TypeIs would narrow AuthorModel away for mypy (issue 15)
    assert not is_mixture_of_experts(cast(object, model))
    with pytest.raises(EplbStateError, match="without MoE layers"):
        model.update_physical_experts_metadata(8, 4)


def test_elastic_updates_reach_every_layer_or_none() -> None:
    layer = swiglu(4, ep=ExpertParallelContext(world_size=2, rank=0))
    model = AuthorModel([layer])
    assert (model.num_physical_experts, model.num_local_physical_experts) == (8, 4)
    model.update_physical_experts_metadata(num_physical_experts=12, num_local_physical_experts=4)
    assert (model.num_physical_experts, model.num_redundant_experts) == (12, 8)
    assert layer.num_physical_experts == 12
    with pytest.raises(EplbStateError, match="cannot change to 3"):
        model.update_physical_experts_metadata(
            num_physical_experts=12, num_local_physical_experts=3
        )
    with pytest.raises(EplbStateError, match="must be an int >= 4 logical experts"):
        model.update_physical_experts_metadata(num_physical_experts=2, num_local_physical_experts=4)
    assert (model.num_physical_experts, layer.num_physical_experts) == (12, 12)
    # The EP group is now 3 ranks; a 2-rank forward is refused, not silently misrouted.
    with pytest.raises(EplbStateError, match="run with an EP group of that size"):
        layer.route(torch.zeros(1, 2, dtype=torch.int64))
