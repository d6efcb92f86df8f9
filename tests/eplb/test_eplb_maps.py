"""Placement maps (initial map, inverse maps, validation) and placement metrics."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_protocols.eplb._maps import (
    compute_logical_maps,
    initial_physical_to_logical_map,
    initial_placement,
    max_replicas,
    validate_placement,
)
from moe_protocols.eplb._metrics import (
    balancedness,
    expected_rank_loads,
    overall_balancedness,
    rank_loads_from_physical,
    slots_changed,
    slots_refetched,
    token_weighted_balancedness,
)
from moe_protocols.errors import MappingError

FAST = settings(max_examples=60, deadline=None)


@st.composite
def placements(draw: st.DrawFn, *, empty_slots: bool = False) -> tuple[torch.Tensor, int]:
    """A random valid ``[L, P]`` placement (every expert at least once per layer) and its E."""
    num_layers = draw(st.integers(1, 3))
    num_logical = draw(st.integers(1, 8))
    num_physical = num_logical + draw(st.integers(0, 8))
    rows = []
    for _ in range(num_layers):
        extra = draw(
            st.lists(
                st.integers(-1 if empty_slots else 0, num_logical - 1),
                min_size=num_physical - num_logical,
                max_size=num_physical - num_logical,
            )
        )
        row = torch.tensor(list(range(num_logical)) + extra, dtype=torch.int64)
        seed = draw(st.integers(0, 2**16))
        perm = torch.randperm(num_physical, generator=torch.Generator().manual_seed(seed))
        rows.append(row[perm])
    return torch.stack(rows), num_logical


# --- initial placement -------------------------------------------------------------------


@pytest.mark.parametrize(("num_logical", "num_physical"), [(4, 4), (4, 6), (3, 10), (256, 288)])
def test_initial_map_lists_experts_then_wraps_redundant_slots(
    num_logical: int, num_physical: int
) -> None:
    row = initial_physical_to_logical_map(num_logical, num_physical)
    assert len(row) == num_physical
    assert row[:num_logical] == list(range(num_logical))
    for slot in range(num_logical, num_physical):
        assert row[slot] == (slot - num_logical) % num_logical


def test_initial_placement_repeats_the_initial_map_on_every_layer() -> None:
    placement = initial_placement(3, 5, 7)
    assert placement.shape == (3, 7)
    assert placement.dtype == torch.int64
    expected = torch.tensor(initial_physical_to_logical_map(5, 7))
    assert all(torch.equal(row, expected) for row in placement)


def test_initial_map_rejects_fewer_slots_than_experts() -> None:
    with pytest.raises(MappingError, match="smaller than num_logical"):
        initial_physical_to_logical_map(5, 4)


def test_max_replicas_fits_the_most_replicated_expert_possible() -> None:
    num_logical, num_physical = 4, 9
    width = max_replicas(num_logical, num_physical)
    assert width == num_physical - num_logical + 1
    # All redundant slots on expert 0: the extreme case must still fit.
    crowded = torch.tensor([[0, 1, 2, 3, 0, 0, 0, 0, 0]])
    l2p, count = compute_logical_maps(crowded, num_logical, width)
    assert int(count[0, 0]) == width
    assert l2p[0, 0].tolist() == [0, 4, 5, 6, 7, 8]


# --- compute_logical_maps ----------------------------------------------------------------


def _assert_exact_inverse(p2l: torch.Tensor, num_logical: int, width: int) -> None:
    l2p, count = compute_logical_maps(p2l, num_logical, width)
    num_layers = p2l.shape[0]
    assert l2p.shape == (num_layers, num_logical, width)
    assert count.shape == (num_layers, num_logical)
    assert l2p.dtype == count.dtype == torch.int64
    for layer in range(num_layers):
        for expert in range(num_logical):
            expected_slots = (p2l[layer] == expert).nonzero().flatten().tolist()
            n = int(count[layer, expert])
            assert n == len(expected_slots)
            # Ascending physical order, then -1 padding.
            assert l2p[layer, expert, :n].tolist() == expected_slots
            assert (l2p[layer, expert, n:] == -1).all()


@FAST
@given(placements())
def test_logical_maps_are_the_exact_inverse_of_the_placement(
    case: tuple[torch.Tensor, int],
) -> None:
    p2l, num_logical = case
    _assert_exact_inverse(p2l, num_logical, max_replicas(num_logical, p2l.shape[1]))


@FAST
@given(placements(empty_slots=True))
def test_logical_maps_ignore_empty_slots(case: tuple[torch.Tensor, int]) -> None:
    p2l, num_logical = case
    _assert_exact_inverse(p2l, num_logical, p2l.shape[1])


def test_logical_maps_accept_narrow_integer_dtypes() -> None:
    p2l = torch.tensor([[1, 0, 1]], dtype=torch.int32)
    l2p, count = compute_logical_maps(p2l, 2, 2)
    assert l2p.tolist() == [[[1, -1], [0, 2]]]
    assert count.tolist() == [[1, 2]]


@pytest.mark.parametrize(
    ("p2l", "num_logical", "width", "fault"),
    [
        (torch.tensor([0, 1]), 2, 1, "must be \\[layers, physical\\]"),
        (torch.tensor([[0.0, 1.0]]), 2, 1, "integer expert ids"),
        (torch.tensor([[0, 2]]), 2, 1, "layer 0, slot 1 holds 2"),
        (torch.tensor([[0, 1], [0, -2]]), 2, 1, "layer 1, slot 1 holds -2"),
        (torch.tensor([[0, 1, 1, 1]]), 2, 2, "layer 0, logical expert 1 has 3 replicas"),
    ],
)
def test_logical_maps_reject_a_bad_placement(
    p2l: torch.Tensor, num_logical: int, width: int, fault: str
) -> None:
    with pytest.raises(MappingError, match=fault):
        compute_logical_maps(p2l, num_logical, width)


# --- validate_placement ------------------------------------------------------------------

GOOD = torch.tensor([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 0, 0]])


def _validate(
    candidate: object,
    *,
    num_layers: int | None = 2,
    num_physical: int | None = 6,
    num_ranks: int = 3,
    num_nodes: int = 1,
) -> torch.Tensor:
    return validate_placement(
        candidate,
        num_layers=num_layers,
        num_logical=4,
        num_physical=num_physical,
        num_ranks=num_ranks,
        num_nodes=num_nodes,
        what="mapping.json",
    )


def test_validate_placement_returns_an_int64_cpu_copy() -> None:
    source = GOOD.to(torch.int32).t().contiguous().t()  # non-contiguous int32
    result = _validate(source)
    assert result.dtype == torch.int64
    assert result.is_contiguous()
    assert torch.equal(result, GOOD)
    result[0, 0] = 3
    assert int(source[0, 0]) == 0


def test_validate_placement_never_aliases_or_mutates_an_int64_input() -> None:
    source = GOOD.clone()
    result = _validate(source)
    result.fill_(0)
    assert torch.equal(source, GOOD)


def test_validate_placement_accepts_unknown_layer_and_slot_counts() -> None:
    assert torch.equal(_validate(GOOD, num_layers=None, num_physical=None), GOOD)


@pytest.mark.parametrize(
    ("candidate", "overrides", "fault"),
    [
        ([[0, 1, 2, 3, 0, 1]], {}, "expected a torch.Tensor"),
        (GOOD[0], {}, "expected 2 dimensions"),
        (GOOD.unsqueeze(0), {}, "expected 2 dimensions"),
        (GOOD.double(), {}, "integer dtype"),
        (GOOD.bool(), {}, "integer dtype"),
        (GOOD[:1], {}, "has 1 layers, expected 2"),
        (GOOD[:, :4], {}, "has 4 physical slots, expected 6"),
        (GOOD, {"num_ranks": 4}, "6 physical slots do not split evenly over 4 EP ranks"),
        (GOOD[:, :3], {"num_physical": None}, "3 physical slots cannot hold 4 logical experts"),
        (torch.tensor([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 0, 4]]), {}, "layer 1, slot 5 holds 4"),
        (torch.tensor([[0, 1, 2, 3, -1, 1], [3, 2, 1, 0, 0, 0]]), {}, "layer 0, slot 4 holds -1"),
        (torch.tensor([[0, 1, 2, 3, 0, 1], [3, 2, 1, 1, 1, 1]]), {}, "layer 1, logical expert 0"),
        (torch.zeros(0, 6, dtype=torch.int64), {"num_layers": None}, "has no layers"),
        (GOOD, {"num_ranks": 3, "num_nodes": 2}, "multiple of num_nodes=2"),
    ],
)
def test_validate_placement_names_the_fault(
    candidate: object, overrides: dict[str, Any], fault: str
) -> None:
    with pytest.raises(MappingError, match=fault) as info:
        _validate(candidate, **overrides)
    assert "mapping.json" in str(info.value)


def test_validate_placement_does_not_mutate_a_rejected_input() -> None:
    bad = torch.tensor([[0, 1, 2, 3, 0, 9], [3, 2, 1, 0, 0, 0]])
    before = bad.clone()
    with pytest.raises(MappingError):
        _validate(bad)
    assert torch.equal(bad, before)


_ODD_DTYPES = [torch.float32, torch.int8, torch.uint8, torch.int16, torch.bool, torch.complex64]


@FAST
@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    dtype=st.sampled_from(_ODD_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_validate_placement_raises_only_mapping_errors_on_junk(
    shape: list[int], dtype: torch.dtype, seed: int
) -> None:
    values = torch.randint(-3, 6, shape, generator=torch.Generator().manual_seed(seed))
    candidate = values.to(dtype)
    try:
        result = validate_placement(
            candidate, num_layers=None, num_logical=3, num_physical=None, num_ranks=1
        )
    except MappingError:
        return
    # Whatever passed must really be a placement.
    assert result.dtype == torch.int64
    assert int(compute_logical_maps(result, 3, result.shape[1])[1].min()) >= 1


# --- metrics -----------------------------------------------------------------------------


def test_rank_loads_sum_each_ranks_consecutive_slots() -> None:
    load = torch.tensor([[1, 2, 3, 4, 5, 6]])
    assert rank_loads_from_physical(load, 3).tolist() == [[3, 7, 11]]
    with pytest.raises(MappingError, match="do not split evenly over 4 EP ranks"):
        rank_loads_from_physical(load, 4)


def test_expected_rank_loads_split_an_expert_evenly_over_its_replicas() -> None:
    p2l = torch.tensor([[0, 1, 0, 2]])  # expert 0 on both ranks
    load = torch.tensor([[10.0, 3.0, 5.0]])
    assert expected_rank_loads(p2l, load, 2).tolist() == [[8.0, 10.0]]


@FAST
@given(placements(), st.integers(0, 2**16))
def test_expected_rank_loads_conserve_the_total_load(
    case: tuple[torch.Tensor, int], seed: int
) -> None:
    p2l, num_logical = case
    load = torch.rand(p2l.shape[0], num_logical, generator=torch.Generator().manual_seed(seed))
    ranks = next(r for r in (3, 2, 1) if p2l.shape[1] % r == 0)
    per_rank = expected_rank_loads(p2l, load, ranks)
    assert per_rank.dtype == torch.float64
    assert torch.allclose(per_rank.sum(dim=1), load.double().sum(dim=1))


def test_expected_rank_loads_reject_a_loaded_expert_without_replica() -> None:
    with pytest.raises(
        MappingError, match=r"layer 0, logical expert 2 has load 1\.0 but no replica"
    ):
        expected_rank_loads(torch.tensor([[0, 1]]), torch.tensor([[1.0, 1.0, 1.0]]), 1)


def test_balancedness_is_mean_over_max_per_layer() -> None:
    rank_load = torch.tensor([[5.0, 5.0, 5.0, 5.0], [8.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 2.0]])
    assert balancedness(rank_load).tolist() == pytest.approx([1.0, 0.25, 2.0 / 3.0])
    assert overall_balancedness(rank_load) == pytest.approx((1.0 + 0.25 + 2.0 / 3.0) / 3)
    # vLLM's aggregate weighs layers by their load: (5 + 2 + 2) / (5 + 8 + 3).
    assert token_weighted_balancedness(rank_load) == pytest.approx(9.0 / 16.0)


def test_a_layer_without_load_counts_as_balanced() -> None:
    idle = torch.zeros(2, 4)
    assert balancedness(idle).tolist() == [1.0, 1.0]
    assert overall_balancedness(idle) == 1.0
    assert token_weighted_balancedness(idle) == 1.0


def test_slots_changed_counts_positions_whose_expert_differs() -> None:
    old = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    new = torch.tensor([[0, 1, 3, 2], [0, 1, 2, 3]])
    assert slots_changed(old, new) == 2
    assert slots_changed(old, old) == 0
    with pytest.raises(MappingError, match="shapes"):
        slots_changed(old, new[:, :2])


def test_slots_refetched_ignores_moves_inside_a_rank() -> None:
    old = torch.tensor([[0, 1, 2, 3]])
    # Rank 0 swaps its two experts (a local copy), rank 1 gets expert 0 (a fetch).
    new = torch.tensor([[1, 0, 2, 0]])
    assert slots_refetched(old, new, 2) == 1
    assert slots_changed(old, new) == 3
