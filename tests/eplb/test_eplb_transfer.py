"""Weight transfer: which slots a plan touches, where experts come from, all-or-nothing commit."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import placement_maps

from moe_protocols.eplb import _transfer
from moe_protocols.eplb._transfer import (
    ExpertCopy,
    apply_transfer,
    plan_transfer,
    stage_transfer,
)
from moe_protocols.errors import TransferError

if TYPE_CHECKING:
    from collections.abc import Sequence

ROW = 6  # values per expert row in the synthetic weights


def expert_rows(experts: torch.Tensor, salt: float = 0.0) -> torch.Tensor:
    """Weights ``[slots, ROW]`` whose row is a fingerprint of the logical expert it holds."""
    base = experts.to(torch.float32).unsqueeze(1) * 100 + salt
    return base + torch.arange(ROW, dtype=torch.float32)


def weights_for(placement: torch.Tensor, num_local: int, rank: int) -> list[list[torch.Tensor]]:
    """Per layer, two weight tensors of one rank laid out as ``placement`` says."""
    first = rank * num_local
    return [
        [
            expert_rows(row[first : first + num_local]),
            expert_rows(row[first : first + num_local], 0.5),
        ]
        for row in placement
    ]


def snapshot(weights: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return [[w.clone() for w in layer] for layer in weights]


def same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    return all(
        torch.equal(x, y) for la, lb in zip(a, b, strict=True) for x, y in zip(la, lb, strict=True)
    )


# --------------------------------------------------------------------------- planning


def test_unchanged_slots_are_never_planned() -> None:
    old = torch.tensor([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1]])
    new = torch.tensor([[0, 1, 2, 3, 2, 2], [0, 1, 2, 3, 0, 1]])
    plan = plan_transfer(old, new, num_local=6, rank=0)
    assert [c.destination for c in plan.layers[0].copies] == [4, 5]
    assert plan.layers[1].copies == ()
    assert plan.slots_changed == 2


def test_every_source_holds_the_expert_in_the_old_map() -> None:
    old = torch.tensor([[3, 2, 1, 0, 0, 1]])
    new = torch.tensor([[0, 1, 2, 3, 3, 3]])
    plan = plan_transfer(old, new, num_local=6, rank=0)
    for copy in plan.layers[0].copies:
        assert int(old[0, copy.source_slot]) == copy.expert == int(new[0, copy.destination])
        assert copy.source_rank == 0


def test_duplicate_destinations_of_one_expert_share_one_source() -> None:
    old = torch.tensor([[0, 1, 2, 3, 2, 1]])
    new = torch.tensor([[0, 1, 2, 3, 3, 3]])
    plan = plan_transfer(old, new, num_local=6, rank=0)
    sources = {(c.source_rank, c.source_slot) for c in plan.layers[0].copies if c.expert == 3}
    assert len(plan.layers[0].copies) == 2
    assert sources == {(0, 3)}


def test_expert_held_only_by_another_rank_is_a_remote_copy_and_a_send() -> None:
    # Two ranks of 3 slots; rank 0 needs expert 4, which only rank 1 holds.
    old = torch.tensor([[0, 1, 2, 3, 4, 5]])
    new = torch.tensor([[0, 1, 4, 3, 2, 5]])
    plan0 = plan_transfer(old, new, num_local=3, rank=0)
    plan1 = plan_transfer(old, new, num_local=3, rank=1)
    assert plan0.layers[0].remote_copies == (ExpertCopy(4, 2, 1, 1),)
    assert [(s.expert, s.destination_rank) for s in plan0.layers[0].sends] == [(2, 1)]
    assert [(s.expert, s.destination_rank) for s in plan1.layers[0].sends] == [(4, 0)]
    assert not plan0.is_local_only


def test_remote_transfers_are_rejected_in_process_and_nothing_is_written() -> None:
    old = torch.tensor([[0, 1, 2, 3, 4, 5]])
    new = torch.tensor([[0, 1, 4, 3, 2, 5]])
    weights = weights_for(old, num_local=3, rank=0)
    before = snapshot(weights)
    plan = plan_transfer(old, new, num_local=3, rank=0)
    with pytest.raises(TransferError, match="not supported in-process") as info:
        apply_transfer(plan, weights)
    assert info.value.layer == 0
    assert info.value.rank == 0
    assert same(weights, before)


def test_moves_inside_each_rank_need_no_network() -> None:
    old = torch.tensor([[0, 1, 2, 3, 4, 5]])
    new = torch.tensor([[2, 0, 1, 5, 3, 4]])
    for rank in range(2):
        plan = plan_transfer(old, new, num_local=3, rank=rank)
        assert plan.is_local_only
        weights = weights_for(old, num_local=3, rank=rank)
        apply_transfer(plan, weights)
        assert same(weights, weights_for(new, num_local=3, rank=rank))


@pytest.mark.parametrize(
    ("old", "new", "num_local", "rank", "message"),
    [
        (
            torch.zeros(2, 4, dtype=torch.int64),
            torch.zeros(2, 5, dtype=torch.int64),
            4,
            0,
            "differ",
        ),
        (torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), 4, 0, "layers"),
        (torch.zeros(1, 6, dtype=torch.int64), torch.zeros(1, 6, dtype=torch.int64), 4, 0, "split"),
        (torch.zeros(1, 6, dtype=torch.int64), torch.zeros(1, 6, dtype=torch.int64), 3, 2, "rank"),
        (torch.tensor([[0, 0, 1]]), torch.tensor([[0, 2, 1]]), 3, 0, "no slot holds"),
        (torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]]), 2, 0, "integer expert ids"),
    ],
)
def test_inconsistent_plan_inputs_are_rejected(
    old: torch.Tensor, new: torch.Tensor, num_local: int, rank: int, message: str
) -> None:
    with pytest.raises(TransferError, match=message):
        plan_transfer(old, new, num_local=num_local, rank=rank)


# --------------------------------------------------------------------------- applying


def test_swapped_slots_read_old_weights_before_writing() -> None:
    # Slots 0 and 1 swap experts: each is source of the other's new expert.
    old = torch.tensor([[0, 1, 2]])
    new = torch.tensor([[1, 0, 2]])
    weights = weights_for(old, num_local=3, rank=0)
    stats = apply_transfer(plan_transfer(old, new, num_local=3, rank=0), weights)
    assert same(weights, weights_for(new, num_local=3, rank=0))
    assert stats.slots_changed == 2
    assert stats.layers_changed == 1


def test_bytes_moved_counts_every_rewritten_row() -> None:
    old = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    new = torch.tensor([[0, 1, 3, 3], [1, 0, 2, 3]])
    weights = weights_for(old, num_local=4, rank=0)
    stats = apply_transfer(plan_transfer(old, new, num_local=4, rank=0), weights)
    row_bytes = 2 * ROW * 4  # two float32 tensors per layer
    assert stats.slots_changed == 3
    assert stats.bytes_moved == 3 * row_bytes


def test_parameters_that_require_grad_are_moved_in_place() -> None:
    old = torch.tensor([[0, 1, 2]])
    new = torch.tensor([[2, 1, 0]])
    param = torch.nn.Parameter(expert_rows(old[0]))
    apply_transfer(plan_transfer(old, new, num_local=3, rank=0), [[param]])
    assert torch.equal(param.detach(), expert_rows(new[0]))
    assert param.requires_grad


def test_byte_views_of_one_byte_weights_are_moved() -> None:
    old = torch.tensor([[0, 1, 2]])
    new = torch.tensor([[2, 2, 1]])
    raw = torch.arange(3 * 4, dtype=torch.uint8).view(3, 4)
    expected = raw[torch.tensor([2, 2, 1])].clone()
    apply_transfer(plan_transfer(old, new, num_local=3, rank=0), [[raw]])
    assert torch.equal(raw, expected)


def test_failure_while_staging_layer_1_leaves_every_layer_untouched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = torch.tensor([[0, 1, 2, 3]] * 3)
    new = torch.tensor([[3, 2, 1, 0]] * 3)
    weights = weights_for(old, num_local=4, rank=0)
    before = snapshot(weights)
    real = _transfer._stage_layer

    def failing(
        plan: _transfer.LayerTransferPlan, layer_weights: Sequence[torch.Tensor]
    ) -> _transfer._StagedLayer:
        if plan.layer == 1:
            raise RuntimeError("injected copy failure")
        return real(plan, layer_weights)

    monkeypatch.setattr(_transfer, "_stage_layer", failing)
    with pytest.raises(TransferError, match="layer 1") as info:
        apply_transfer(plan_transfer(old, new, num_local=4, rank=0), weights)
    assert info.value.layer == 1
    assert isinstance(info.value.__cause__, RuntimeError)
    assert same(weights, before)


def test_weights_that_do_not_match_the_plan_are_rejected_untouched() -> None:
    old = torch.tensor([[0, 1, 2, 3]] * 2)
    new = torch.tensor([[3, 2, 1, 0]] * 2)
    plan = plan_transfer(old, new, num_local=4, rank=0)
    good = weights_for(old, num_local=4, rank=0)
    wrong_rows = [good[0], [torch.zeros(3, ROW)]]
    with pytest.raises(TransferError, match=r"expert_weights\[1\]\[0\]") as info:
        apply_transfer(plan, wrong_rows)
    assert info.value.layer == 1
    with pytest.raises(TransferError, match="1 layers"):
        apply_transfer(plan, good[:1])
    assert same(good, weights_for(old, num_local=4, rank=0))


def test_staging_alone_writes_nothing() -> None:
    old = torch.tensor([[0, 1, 2]])
    new = torch.tensor([[2, 0, 1]])
    weights = weights_for(old, num_local=3, rank=0)
    staged = stage_transfer(plan_transfer(old, new, num_local=3, rank=0), weights)
    assert same(weights, weights_for(old, num_local=3, rank=0))
    staged.commit()
    assert same(weights, weights_for(new, num_local=3, rank=0))


@st.composite
def placement_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    num_layers = draw(st.integers(1, 3))
    num_logical = draw(st.integers(1, 6))
    num_physical = num_logical + draw(st.integers(0, 4))

    maps = placement_maps(num_layers, num_logical, num_physical)

    return draw(maps), draw(maps)


@settings(max_examples=60, deadline=None)
@given(placement_pairs())
def test_every_slot_holds_its_new_experts_weights_after_any_single_rank_move(
    maps: tuple[torch.Tensor, torch.Tensor],
) -> None:
    old, new = maps
    num_local = old.shape[1]
    weights = weights_for(old, num_local=num_local, rank=0)
    plan = plan_transfer(old, new, num_local=num_local, rank=0)
    stats = apply_transfer(plan, weights)
    assert same(weights, weights_for(new, num_local=num_local, rank=0))
    assert stats.slots_changed == int((old != new).sum())
