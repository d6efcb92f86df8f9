"""Per-step replica dispatch: shares that lower the step's peak, and a routing rule that obeys them.

Users rely on three things: a token only ever goes to a slot that holds its
expert, each expert's shares form a distribution over its own replicas, and
the split is never worse than the even one (and optimal where the optimum is
known by hand).
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import placement_maps

from moe_protocols.eplb import (
    balanced_dispatch,
    dispatch_to_replicas,
    rank_loads_from_shares,
    replica_shares,
)
from moe_protocols.eplb._maps import compute_logical_maps, max_replicas
from moe_protocols.errors import MappingError


def _maps(placement: torch.Tensor, num_logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    return compute_logical_maps(
        placement, num_logical, max_replicas(num_logical, placement.shape[1])
    )


def _peak(l2p: torch.Tensor, load: torch.Tensor, shares: torch.Tensor, p: int, r: int) -> float:
    return float(rank_loads_from_shares(l2p, load, shares, num_physical=p, num_ranks=r).max())


# Two ranks, two slots each: rank 0 holds A (load 6) and C, rank 1 holds B (load 2) and C
# (load 4). Even split: 6 + 2 = 8 against 2 + 2 = 4. Optimum: all of C on rank 1, 6 and 6.
TWO_RANKS = torch.tensor([[0, 2, 1, 2]])
TWO_RANK_LOAD = torch.tensor([[6.0, 2.0, 4.0]])


def test_two_rank_case_reaches_the_hand_worked_optimum() -> None:
    l2p, count = _maps(TWO_RANKS, 3)
    even = replica_shares(l2p, count, TWO_RANK_LOAD, num_physical=4, num_ranks=2, num_rounds=0)
    assert _peak(l2p, TWO_RANK_LOAD, even, 4, 2) == 8.0
    shares = replica_shares(l2p, count, TWO_RANK_LOAD, num_physical=4, num_ranks=2)
    loads = rank_loads_from_shares(l2p, TWO_RANK_LOAD, shares, num_physical=4, num_ranks=2)
    assert torch.allclose(loads, torch.tensor([[6.0, 6.0]]))
    # C's replica on rank 1 (slot 3) takes everything.
    assert torch.allclose(shares[0, 2, :2], torch.tensor([0.0, 1.0]))


def test_a_chain_of_replicas_carries_load_two_ranks_away() -> None:
    # rank 0: A (6) + X; rank 1: X + Y; rank 2: Y + B (0). X = Y = 6, mean 6.
    # Even split puts 9 on rank 0; the optimum (6, 6, 6) needs X all on rank 1
    # and therefore Y all on rank 2.
    placement = torch.tensor([[0, 1, 1, 2, 2, 3]])
    load = torch.tensor([[6.0, 6.0, 6.0, 0.0]])
    l2p, count = _maps(placement, 4)
    peaks = [
        _peak(
            l2p,
            load,
            replica_shares(l2p, count, load, num_physical=6, num_ranks=3, num_rounds=rounds),
            6,
            3,
        )
        for rounds in (0, 1, 4, 16, 64)
    ]
    assert peaks[0] == 9.0
    assert all(later <= earlier for earlier, later in pairwise(peaks))
    assert peaks[-1] == pytest.approx(6.0, rel=1e-3)


def test_a_second_replica_on_the_same_rank_gets_nothing() -> None:
    # Expert 0 twice on rank 0, once on rank 1.
    placement = torch.tensor([[0, 0, 0, 1]])
    load = torch.tensor([[4.0, 0.0]])
    l2p, count = _maps(placement, 2)
    shares = replica_shares(l2p, count, load, num_physical=4, num_ranks=2)
    assert float(shares[0, 0, 1]) == 0.0
    assert _peak(l2p, load, shares, 4, 2) == pytest.approx(2.0)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    num_logical=st.integers(2, 10),
    extra=st.integers(0, 8),
    num_ranks=st.sampled_from([1, 2, 3, 4]),
    rounds=st.integers(0, 10),
)
def test_shares_are_distributions_over_real_replicas_and_never_raise_the_peak(
    data: st.DataObject, num_logical: int, extra: int, num_ranks: int, rounds: int
) -> None:
    num_physical = num_logical + extra
    num_physical += (-num_physical) % num_ranks
    placement = data.draw(placement_maps(2, num_logical, num_physical))
    load = torch.tensor(
        data.draw(
            st.lists(
                st.lists(st.integers(0, 1000), min_size=num_logical, max_size=num_logical),
                min_size=2,
                max_size=2,
            )
        ),
        dtype=torch.float64,
    )
    l2p, count = _maps(placement, num_logical)
    before = (l2p.clone(), count.clone(), load.clone())
    kw = {"num_physical": num_physical, "num_ranks": num_ranks}
    shares = replica_shares(l2p, count, load, num_rounds=rounds, **kw)
    assert torch.equal(l2p, before[0])
    assert torch.equal(count, before[1])
    assert torch.equal(load, before[2])
    padded = torch.arange(l2p.shape[-1]) >= count.unsqueeze(-1)
    assert bool((shares >= 0).all())
    assert bool((shares[padded] == 0).all())
    assert torch.allclose(shares.sum(dim=-1), torch.ones_like(load))
    even = replica_shares(l2p, count, load, num_rounds=0, **kw)
    rank_load = rank_loads_from_shares(l2p, load, shares, **kw)
    even_load = rank_loads_from_shares(l2p, load, even, **kw)
    assert bool((rank_load.amax(-1) <= even_load.amax(-1) + 1e-9).all())
    # Nothing is lost or invented, and no split beats the average rank.
    assert torch.allclose(rank_load.sum(-1), load.sum(-1))
    assert bool((rank_load.amax(-1) >= load.sum(-1) / num_ranks - 1e-9).all())


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    num_logical=st.integers(2, 8),
    extra=st.integers(0, 8),
    num_ranks=st.sampled_from([1, 2, 4]),
    num_tokens=st.integers(1, 64),
    top_k=st.integers(1, 2),
)
def test_routing_sends_every_choice_to_a_slot_of_its_expert_in_the_planned_amounts(
    data: st.DataObject,
    num_logical: int,
    extra: int,
    num_ranks: int,
    num_tokens: int,
    top_k: int,
) -> None:
    num_physical = num_logical + extra
    num_physical += (-num_physical) % num_ranks
    placement = data.draw(placement_maps(1, num_logical, num_physical))
    l2p, count = _maps(placement, num_logical)
    ids = torch.tensor(
        data.draw(
            st.lists(
                st.integers(0, num_logical - 1),
                min_size=num_tokens * top_k,
                max_size=num_tokens * top_k,
            )
        )
    ).view(num_tokens, top_k)
    physical = balanced_dispatch(
        ids, l2p[0], count[0], num_physical=num_physical, num_ranks=num_ranks
    )
    assert physical.shape == ids.shape
    assert torch.equal(placement[0][physical], ids)
    # Each replica serves its share of the expert's choices, to within one.
    counts = torch.bincount(ids.reshape(-1), minlength=num_logical).to(torch.float64)
    shares = replica_shares(
        l2p, count, counts.unsqueeze(0), num_physical=num_physical, num_ranks=num_ranks
    )[0]
    served = torch.bincount(physical.reshape(-1), minlength=num_physical).to(torch.float64)
    for expert in range(num_logical):
        for j in range(int(count[0, expert])):
            slot = int(l2p[0, expert, j])
            assert abs(served[slot] - shares[expert, j] * counts[expert]) <= 1.0 + 1e-9


def test_routing_matches_the_shares_it_is_given() -> None:
    l2p, _count = _maps(TWO_RANKS, 3)
    ids = torch.tensor([[2], [2], [2], [2], [0], [1]])
    shares = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.25, 0.75]])
    physical = dispatch_to_replicas(ids, l2p[0], shares)
    # Expert 2's four choices: one to slot 1 (rank 0), three to slot 3 (rank 1), in token order.
    assert physical.reshape(-1).tolist() == [1, 3, 3, 3, 0, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_ranks": 3}, "do not split evenly"),
        ({"num_ranks": 0}, "num_ranks must be an int >= 1"),
        ({"num_rounds": -1}, "num_rounds must be an int >= 0"),
        ({"load": torch.ones(1, 2)}, "logical_load"),
        ({"count": torch.ones(1, 3)}, "integer tensor"),
        ({"l2p": torch.zeros(3, dtype=torch.int64)}, "max_replicas"),
    ],
)
def test_bad_dispatch_inputs_are_rejected_by_name(kwargs: dict[str, object], message: str) -> None:
    l2p, count = _maps(TWO_RANKS, 3)
    args: dict[str, object] = {
        "l2p": l2p,
        "count": count,
        "load": TWO_RANK_LOAD,
        "num_physical": 4,
        "num_ranks": 2,
        "num_rounds": 4,
    }
    args.update(kwargs)
    with pytest.raises(MappingError, match=message):
        replica_shares(
            args["l2p"],  # type: ignore[arg-type]  # deliberately loose for bad inputs
            args["count"],  # type: ignore[arg-type]  # deliberately loose for bad inputs
            args["load"],  # type: ignore[arg-type]  # deliberately loose for bad inputs
            num_physical=args["num_physical"],  # type: ignore[arg-type]  # bad-input test
            num_ranks=args["num_ranks"],  # type: ignore[arg-type]  # bad-input test
            num_rounds=args["num_rounds"],  # type: ignore[arg-type]  # bad-input test
        )


def test_routing_rejects_float_ids_and_mismatched_shares() -> None:
    l2p, _ = _maps(TWO_RANKS, 3)
    with pytest.raises(MappingError, match="integer"):
        dispatch_to_replicas(torch.zeros(2, 1), l2p[0], torch.ones(3, 2))
    with pytest.raises(MappingError, match="same"):
        dispatch_to_replicas(torch.zeros(2, 1, dtype=torch.int64), l2p[0], torch.ones(3, 3))
