"""The rebalancing-policy contract, the registry, and the DeepSeek EPLB policy."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_protocols.eplb._maps import compute_logical_maps, initial_placement, max_replicas
from moe_protocols.eplb._metrics import expected_rank_loads, overall_balancedness
from moe_protocols.eplb.policies import (
    DEFAULT_POLICIES,
    DeepSeekPolicy,
    PolicyRegistry,
    RebalancePolicy,
    check_policy_inputs,
    check_policy_output,
    preserve_intra_rank_slots,
)
from moe_protocols.eplb.policies.deepseek import (
    balanced_packing,
    rebalance_global,
    rebalance_hierarchical,
    replicate_experts,
)
from moe_protocols.errors import PolicyError

FAST = settings(max_examples=60, deadline=None)


@attrs.frozen
class Shape:
    """A consistent EPLB problem size."""

    layers: int
    logical: int
    physical: int
    groups: int
    nodes: int
    ranks: int

    @property
    def slots_per_rank(self) -> int:
        return self.physical // self.ranks


@st.composite
def hierarchical_shapes(draw: st.DrawFn) -> Shape:
    nodes = draw(st.integers(1, 3))
    ranks = nodes * draw(st.integers(1, 3))
    groups = nodes * draw(st.integers(1, 3))
    logical = groups * draw(st.integers(1, 4))
    slots_per_rank = -(-logical // ranks) + draw(st.integers(0, 2))
    return Shape(draw(st.integers(1, 3)), logical, ranks * slots_per_rank, groups, nodes, ranks)


@st.composite
def any_shapes(draw: st.DrawFn) -> Shape:
    """Shapes that include groups that do not fit nodes (the global fallback)."""
    nodes = draw(st.integers(1, 3))
    ranks = nodes * draw(st.integers(1, 3))
    logical = draw(st.integers(1, 12))
    groups = draw(st.integers(1, 5))
    slots_per_rank = -(-logical // ranks) + draw(st.integers(0, 2))
    return Shape(draw(st.integers(1, 3)), logical, ranks * slots_per_rank, groups, nodes, ranks)


@st.composite
def loads(draw: st.DrawFn, layers: int, logical: int) -> torch.Tensor:
    """Random loads; small integers on purpose, so that ties happen often."""
    values = draw(
        st.lists(
            st.one_of(st.integers(0, 5), st.floats(0, 1e4)),
            min_size=layers * logical,
            max_size=layers * logical,
        )
    )
    return torch.tensor(values, dtype=torch.float64).view(layers, logical)


def random_placement(shape: Shape, seed: int) -> torch.Tensor:
    """A valid placement with random redundant experts and a random slot order."""
    gen = torch.Generator().manual_seed(seed)
    extra = torch.randint(
        0, shape.logical, (shape.layers, shape.physical - shape.logical), generator=gen
    )
    base = torch.arange(shape.logical).expand(shape.layers, -1)
    rows = torch.cat([base, extra], dim=1)
    order = torch.argsort(torch.rand(shape.layers, shape.physical, generator=gen), dim=1)
    return rows.gather(1, order)


def rank_multisets(p2l: torch.Tensor, ranks: int) -> list[list[Counter[int]]]:
    slots = p2l.shape[1] // ranks
    return [
        [Counter(row[r * slots : (r + 1) * slots].tolist()) for r in range(ranks)] for row in p2l
    ]


def assert_valid_policy_output(p2l: torch.Tensor, shape: Shape) -> None:
    assert p2l.shape == (shape.layers, shape.physical)
    assert p2l.dtype == torch.int64
    assert p2l.device.type == "cpu"
    assert int(p2l.min()) >= 0
    assert int(p2l.max()) < shape.logical
    l2p, count = compute_logical_maps(
        p2l, shape.logical, max_replicas(shape.logical, shape.physical)
    )
    assert int(count.min()) >= 1, "every logical expert needs a replica in every layer"
    assert torch.equal(count.sum(dim=1), torch.full((shape.layers,), shape.physical))
    # The inverse maps point back at slots holding the right expert.
    for layer in range(shape.layers):
        for expert in range(shape.logical):
            slots = l2p[layer, expert, : int(count[layer, expert])]
            assert (p2l[layer, slots] == expert).all()


# --- policy invariants --------------------------------------------------------------------


@FAST
@given(st.data())
def test_policy_output_is_a_complete_placement(data: st.DataObject) -> None:
    shape = data.draw(any_shapes())
    weight = data.draw(loads(shape.layers, shape.logical))
    p2l = DeepSeekPolicy().rebalance_experts(
        weight, shape.physical, shape.groups, shape.nodes, shape.ranks
    )
    assert_valid_policy_output(p2l, shape)


@FAST
@given(st.data())
def test_hierarchical_policy_keeps_whole_groups_on_one_node(data: st.DataObject) -> None:
    shape = data.draw(hierarchical_shapes())
    weight = data.draw(loads(shape.layers, shape.logical))
    p2l = DeepSeekPolicy().rebalance_experts(
        weight, shape.physical, shape.groups, shape.nodes, shape.ranks
    )
    assert_valid_policy_output(p2l, shape)
    group_size = shape.logical // shape.groups
    slots_per_node = shape.physical // shape.nodes
    for row in p2l:
        node_of_slot = torch.arange(shape.physical) // slots_per_node
        group_of_slot = row // group_size
        for group in range(shape.groups):
            nodes = set(node_of_slot[group_of_slot == group].tolist())
            assert len(nodes) == 1, f"group {group} is spread over nodes {sorted(nodes)}"
        for node in range(shape.nodes):
            groups = set(group_of_slot[node_of_slot == node].tolist())
            assert len(groups) == shape.groups // shape.nodes
            # Whole groups: every expert of a group on this node lives here.
            experts = set(row[node_of_slot == node].tolist())
            assert len(experts) == len(groups) * group_size


@FAST
@given(st.data())
def test_policy_is_deterministic_and_leaves_inputs_untouched(data: st.DataObject) -> None:
    shape = data.draw(any_shapes())
    weight = data.draw(loads(shape.layers, shape.logical))
    old = random_placement(shape, data.draw(st.integers(0, 2**16)))
    weight_before, old_before = weight.clone(), old.clone()
    policy = DeepSeekPolicy()
    args = (shape.physical, shape.groups, shape.nodes, shape.ranks)
    first = policy.rebalance_experts(weight, *args, old)
    second = policy.rebalance_experts(weight.clone(), *args, old.clone())
    assert torch.equal(first, second)
    assert torch.equal(weight, weight_before)
    assert torch.equal(old, old_before)


@FAST
@given(st.data())
def test_old_placement_only_reorders_slots_within_each_rank(data: st.DataObject) -> None:
    shape = data.draw(any_shapes())
    weight = data.draw(loads(shape.layers, shape.logical))
    old = random_placement(shape, data.draw(st.integers(0, 2**16)))
    policy = DeepSeekPolicy()
    args = (shape.physical, shape.groups, shape.nodes, shape.ranks)
    fresh = policy.rebalance_experts(weight, *args)
    kept = policy.rebalance_experts(weight, *args, old)
    assert rank_multisets(kept, shape.ranks) == rank_multisets(fresh, shape.ranks)
    assert_stayers_keep_their_slots(kept, old, shape.ranks)


def test_policy_chooses_global_when_groups_do_not_fit_nodes() -> None:
    weight = torch.rand(2, 12, generator=torch.Generator().manual_seed(1))
    policy = DeepSeekPolicy()
    # 3 groups cannot be split over 2 nodes: the published rule falls back to global.
    assert torch.equal(
        policy.rebalance_experts(weight, 16, 3, 2, 8),
        rebalance_global(weight.double(), 16, 1, 1, 8),
    )
    # 5 groups do not divide 12 experts.
    assert torch.equal(
        policy.rebalance_experts(weight, 16, 5, 1, 8),
        rebalance_global(weight.double(), 16, 1, 1, 8),
    )
    assert torch.equal(
        policy.rebalance_experts(weight, 16, 4, 2, 8),
        rebalance_hierarchical(weight.double(), 16, 4, 2, 8),
    )


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float16, torch.float32])
def test_policy_accepts_any_real_load_dtype(dtype: torch.dtype) -> None:
    weight = torch.tensor([[5, 1, 1, 9], [0, 0, 0, 0]], dtype=dtype)
    p2l = DeepSeekPolicy().rebalance_experts(weight, 6, 2, 1, 2)
    assert_valid_policy_output(p2l, Shape(2, 4, 6, 2, 1, 2))
    # The hottest expert of layer 0 gets the redundant slots' first pick.
    assert int((p2l[0] == 3).sum()) == 2


# --- published example and balance ---------------------------------------------------------

# The example printed in the deepseek-ai/EPLB README (2 layers x 12 experts, 16 replicas,
# 4 groups, 2 nodes, 8 GPUs) together with the placement it prints.
README_WEIGHT = torch.tensor(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)
README_PHY2LOG = torch.tensor(
    [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
)


def test_readme_example_reproduces_the_published_placement() -> None:
    p2l = DEFAULT_POLICIES.get("deepseek").rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert torch.equal(p2l, README_PHY2LOG)


def test_readme_example_balances_better_than_the_initial_placement() -> None:
    initial = initial_placement(2, 12, 16)
    p2l = DeepSeekPolicy().rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    before = overall_balancedness(expected_rank_loads(initial, README_WEIGHT, 8))
    after = overall_balancedness(expected_rank_loads(p2l, README_WEIGHT, 8))
    assert after > before
    # The global variant ignores the node constraint and can only do as well or better here.
    free = rebalance_global(README_WEIGHT.double(), 16, 1, 1, 8)
    assert overall_balancedness(expected_rank_loads(free, README_WEIGHT, 8)) >= after


@pytest.mark.parametrize(("groups", "nodes"), [(1, 1), (4, 2), (8, 4)])
def test_skewed_load_is_better_balanced_after_rebalancing(groups: int, nodes: int) -> None:
    layers, logical, physical, ranks = 4, 32, 40, 8
    gen = torch.Generator().manual_seed(7)
    # Zipf-like popularity over a random permutation of the experts in every layer.
    popularity = torch.argsort(torch.rand(layers, logical, generator=gen), dim=1) + 1
    weight = 1000.0 / popularity.double() ** 1.1
    initial = initial_placement(layers, logical, physical)
    p2l = DeepSeekPolicy().rebalance_experts(weight, physical, groups, nodes, ranks)
    before = overall_balancedness(expected_rank_loads(initial, weight, ranks))
    after = overall_balancedness(expected_rank_loads(p2l, weight, ranks))
    assert after > before


# --- replicate_experts ---------------------------------------------------------------------


def brute_force_min_max_load(weight: list[float], num_phy: int) -> float:
    best = float("inf")
    for counts in itertools.product(range(1, num_phy - len(weight) + 2), repeat=len(weight)):
        if sum(counts) == num_phy:
            best = min(best, max(w / c for w, c in zip(weight, counts, strict=True)))
    return best


@FAST
@given(
    st.lists(st.integers(0, 50), min_size=1, max_size=4),
    st.integers(0, 4),
)
def test_replicate_experts_minimises_the_hottest_replica(weight: list[int], extra: int) -> None:
    num_phy = len(weight) + extra
    tensor = torch.tensor([weight], dtype=torch.float64)
    phy2log, replica_rank, logcnt = replicate_experts(tensor, num_phy)
    achieved = float((tensor / logcnt).max())
    assert achieved == pytest.approx(brute_force_min_max_load([float(w) for w in weight], num_phy))
    # The three outputs describe the same replicas.
    assert torch.equal(phy2log[0, : len(weight)], torch.arange(len(weight)))
    assert torch.equal(torch.bincount(phy2log[0], minlength=len(weight)), logcnt[0])
    for expert in range(len(weight)):
        ranks = replica_rank[0, phy2log[0] == expert]
        assert ranks.tolist() == list(range(int(logcnt[0, expert])))


def test_replicate_experts_solves_every_row_independently() -> None:
    weight = torch.tensor([[10.0, 1.0, 1.0], [1.0, 1.0, 10.0]])
    _, _, logcnt = replicate_experts(weight, 5)
    assert logcnt.tolist() == [[3, 1, 1], [1, 1, 3]]


# --- balanced_packing ----------------------------------------------------------------------


def reference_packing(weight: list[float], num_packs: int) -> list[int]:
    """Plain statement of the rule: heaviest first, into the lightest pack with room."""
    per_pack = len(weight) // num_packs
    load = [0.0] * num_packs
    count = [0] * num_packs
    pack_of = [0] * len(weight)
    for item in sorted(range(len(weight)), key=lambda i: (-weight[i], i)):
        pack = min((p for p in range(num_packs) if count[p] < per_pack), key=lambda p: (load[p], p))
        pack_of[item] = pack
        load[pack] += weight[item]
        count[pack] += 1
    return pack_of


@FAST
@given(st.data())
def test_balanced_packing_follows_the_greedy_rule_with_equal_pack_sizes(
    data: st.DataObject,
) -> None:
    num_packs = data.draw(st.integers(1, 4))
    per_pack = data.draw(st.integers(2, 4))
    rows = data.draw(st.integers(1, 3))
    weight = data.draw(loads(rows, num_packs * per_pack))
    pack_index, rank_in_pack = balanced_packing(weight, num_packs)
    for row in range(rows):
        assert pack_index[row].tolist() == reference_packing(weight[row].tolist(), num_packs)
        assert torch.equal(
            torch.bincount(pack_index[row], minlength=num_packs), torch.full((num_packs,), per_pack)
        )
        for pack in range(num_packs):
            positions = rank_in_pack[row, pack_index[row] == pack]
            assert sorted(positions.tolist()) == list(range(per_pack))


def test_balanced_packing_with_one_item_per_pack_is_the_identity() -> None:
    weight = torch.tensor([[1.0, 9.0, 5.0]])
    pack_index, rank_in_pack = balanced_packing(weight, 3)
    assert pack_index.tolist() == [[0, 1, 2]]
    assert rank_in_pack.tolist() == [[0, 0, 0]]


# --- preserve_intra_rank_slots -------------------------------------------------------------


def assert_stayers_keep_their_slots(result: torch.Tensor, old: torch.Tensor, ranks: int) -> None:
    """As many slots as possible keep their old expert, rank by rank."""
    slots = old.shape[1] // ranks
    for layer in range(old.shape[0]):
        for rank in range(ranks):
            window = slice(rank * slots, (rank + 1) * slots)
            res, before = result[layer, window], old[layer, window]
            overlap = Counter(res.tolist()) & Counter(before.tolist())
            assert int((res == before).sum()) == sum(overlap.values())


@FAST
@given(st.data())
def test_preserve_slots_keeps_rank_contents_and_stayers_in_place(data: st.DataObject) -> None:
    shape = data.draw(any_shapes())
    new = random_placement(shape, data.draw(st.integers(0, 2**16)))
    old = random_placement(shape, data.draw(st.integers(0, 2**16)))
    result = preserve_intra_rank_slots(new, old, shape.ranks)
    assert result.dtype == torch.int64
    assert rank_multisets(result, shape.ranks) == rank_multisets(new, shape.ranks)
    assert_stayers_keep_their_slots(result, old, shape.ranks)
    assert torch.equal(preserve_intra_rank_slots(new, old, shape.ranks), result)


def test_preserve_slots_fills_freed_slots_in_order() -> None:
    old = torch.tensor([[0, 1, 2, 3, 4, 5]])
    new = torch.tensor([[7, 2, 6, 5, 3, 4]])
    # Rank 0 keeps expert 2 in slot 2; newcomers 7 and 6 take slots 0 and 1.
    # Rank 1 holds the same experts as before: nothing moves.
    assert preserve_intra_rank_slots(new, old, 2).tolist() == [[7, 6, 2, 3, 4, 5]]


def test_preserve_slots_treats_empty_old_slots_as_free() -> None:
    old = torch.tensor([[-1, 1, -1, 3]])
    new = torch.tensor([[1, 0, 2, 3]])
    assert preserve_intra_rank_slots(new, old, 2).tolist() == [[0, 1, 2, 3]]


def test_preserve_slots_keeps_a_new_map_of_another_shape() -> None:
    new = torch.tensor([[0, 1, 2, 3]])
    assert torch.equal(preserve_intra_rank_slots(new, torch.tensor([[3, 2, 1, 0, 0, 0]]), 2), new)


# --- input and output checks -----------------------------------------------------------------

GOOD_WEIGHT = torch.ones(2, 4)


@pytest.mark.parametrize(
    ("args", "fault"),
    [
        ((GOOD_WEIGHT.tolist(), 4, 1, 1, 1, None), "weight must be a torch.Tensor"),
        ((torch.ones(4), 4, 1, 1, 1, None), "non-empty 2-D tensor"),
        ((torch.ones(2, 0), 4, 1, 1, 1, None), "non-empty 2-D tensor"),
        ((GOOD_WEIGHT.bool(), 4, 1, 1, 1, None), "real loads"),
        (
            (torch.tensor([[1.0, -2.0, 0.0, 0.0]]), 4, 1, 1, 1, None),
            "layer 0, logical expert 1 has negative",
        ),
        (
            (torch.tensor([[1.0, 0.0], [0.0, float("nan")]]), 2, 1, 1, 1, None),
            "layer 1, logical expert 1 has non-finite",
        ),
        ((torch.tensor([[float("inf"), 0.0]]), 2, 1, 1, 1, None), "non-finite"),
        ((GOOD_WEIGHT, 3, 1, 1, 1, None), "num_replicas=3 is smaller than the 4 logical experts"),
        ((GOOD_WEIGHT, 6, 1, 1, 4, None), "num_replicas=6 must be a multiple of num_ranks=4"),
        ((GOOD_WEIGHT, 6, 1, 2, 3, None), "num_ranks=3 must be a multiple of num_nodes=2"),
        ((GOOD_WEIGHT, 0, 1, 1, 1, None), "num_replicas must be an int >= 1"),
        ((GOOD_WEIGHT, 4, 0, 1, 1, None), "num_groups must be an int >= 1"),
        ((GOOD_WEIGHT, 4, 1, True, 1, None), "num_nodes must be an int >= 1"),
        ((GOOD_WEIGHT, 4, 1, 1, 2.0, None), "num_ranks must be an int >= 1"),
        ((GOOD_WEIGHT, 4, 1, 1, 1, [[0, 1, 2, 3]]), "must be a torch.Tensor"),
        (
            (GOOD_WEIGHT, 4, 1, 1, 1, torch.zeros(3, 4, dtype=torch.int64)),
            "must be \\[2, physical\\]",
        ),
        ((GOOD_WEIGHT, 4, 1, 1, 1, torch.zeros(2, 4)), "integer expert ids"),
        (
            (GOOD_WEIGHT, 4, 1, 1, 1, torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4]])),
            "layer 1, slot 3 holds 4",
        ),
    ],
)
def test_policy_inputs_are_rejected_with_the_fault_named(args: tuple[Any, ...], fault: str) -> None:
    with pytest.raises(PolicyError, match=fault):
        check_policy_inputs(*args)
    with pytest.raises(PolicyError, match=fault):
        DeepSeekPolicy().rebalance_experts(*args)


def test_policy_inputs_come_back_as_a_float64_cpu_copy() -> None:
    weight = torch.tensor([[1, 2, 3, 4]], dtype=torch.int32)
    load = check_policy_inputs(weight, 4, 1, 1, 1, torch.tensor([[3, 2, 1, -1]]))
    assert load.dtype == torch.float64
    load[0, 0] = 100
    assert int(weight[0, 0]) == 1


@pytest.mark.parametrize(
    ("new_map", "fault"),
    [
        (torch.tensor([[0, 1, 2, 3]]), "has 1 layers, expected 2"),
        (torch.tensor([[0, 1, 2, 3], [0, 1, 2, 2]]), "layer 1, logical expert 3 has no replica"),
        (torch.tensor([[0, 1, 2, 3], [0, 1, 2, 7]]), "layer 1, slot 3 holds 7"),
        (torch.zeros(2, 4), "integer dtype"),
        ("not a tensor", "expected a torch.Tensor"),
    ],
)
def test_bad_policy_output_is_reported_as_the_policys_fault(new_map: object, fault: str) -> None:
    with pytest.raises(PolicyError, match=fault) as info:
        check_policy_output("broken", new_map, GOOD_WEIGHT, 4, 2)
    assert "'broken'" in str(info.value)


# --- registry ------------------------------------------------------------------------------


@attrs.frozen
class FixedPolicy:
    """A trivial policy for registry tests: always the initial placement."""

    name: str = "fixed"

    def rebalance_experts(
        self,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_physical_to_logical_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        load = check_policy_inputs(
            weight, num_replicas, num_groups, num_nodes, num_ranks, old_physical_to_logical_map
        )
        new_map = initial_placement(load.shape[0], load.shape[1], num_replicas)
        return check_policy_output(self.name, new_map, load, num_replicas, num_ranks)


def test_default_registry_holds_deepseek_under_both_names() -> None:
    assert DEFAULT_POLICIES.names == ("deepseek", "default", "migration_aware")
    assert DEFAULT_POLICIES.get("default") is DEFAULT_POLICIES.get("deepseek")
    assert DEFAULT_POLICIES.get("deepseek").name == "deepseek"
    assert isinstance(DeepSeekPolicy(), RebalancePolicy)
    assert "deepseek" in DEFAULT_POLICIES
    assert "flashlb" not in DEFAULT_POLICIES


def test_unknown_policy_error_lists_the_known_ones() -> None:
    with pytest.raises(
        PolicyError, match="unknown EPLB policy 'flashlb'; known policies: deepseek, default"
    ):
        DEFAULT_POLICIES.get("flashlb")


def test_with_policy_returns_a_new_registry_and_leaves_the_old_one_alone() -> None:
    extended = DEFAULT_POLICIES.with_policy(FixedPolicy())
    assert "fixed" in extended
    assert "fixed" not in DEFAULT_POLICIES
    assert isinstance(extended, PolicyRegistry)
    p2l = extended.get("fixed").rebalance_experts(GOOD_WEIGHT, 6, 1, 1, 2)
    assert torch.equal(p2l, initial_placement(2, 4, 6))


def test_registering_a_taken_name_needs_replace() -> None:
    with pytest.raises(PolicyError, match="'deepseek' is already registered"):
        DEFAULT_POLICIES.with_policy(FixedPolicy(name="deepseek"))
    replaced = DEFAULT_POLICIES.with_policy(FixedPolicy(name="deepseek"), replace=True)
    assert replaced.get("deepseek") == FixedPolicy(name="deepseek")
    assert replaced.get("default") is DEFAULT_POLICIES.get("default")


def test_registry_rejects_objects_that_are_not_policies() -> None:
    with pytest.raises(PolicyError, match="does not implement RebalancePolicy"):
        DEFAULT_POLICIES.with_policy(object())  # type: ignore[arg-type]  # the point of the test
    with pytest.raises(PolicyError, match="does not implement RebalancePolicy"):
        PolicyRegistry({"x": object()})  # type: ignore[dict-item]  # the point of the test


def test_registry_contents_cannot_be_changed_from_outside() -> None:
    source: dict[str, RebalancePolicy] = {"fixed": FixedPolicy()}
    registry = PolicyRegistry(source)
    source["other"] = FixedPolicy(name="other")
    assert registry.names == ("fixed",)


def test_building_blocks_reject_impossible_sizes() -> None:
    with pytest.raises(PolicyError, match="num_phy=2 must be >= the number of experts 3"):
        replicate_experts(torch.ones(1, 3), 2)
    with pytest.raises(PolicyError, match="num_packs=2 must be >= 1 and divide the item count 3"):
        balanced_packing(torch.ones(1, 3), 2)
    with pytest.raises(PolicyError, match="inconsistent shape"):
        rebalance_hierarchical(torch.ones(1, 6), 8, 4, 2, 4)
