"""Fingerprints and the undo of a commit: pure pieces, checked on random placements."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import placement_maps

from moe_protocols.eplb._fingerprint import SAMPLED_WORDS, row_digests
from moe_protocols.eplb._integrity import UndoRows, aliasing_problem, build_table
from moe_protocols.eplb._transfer import plan_transfer, stage_transfer

LAYERS, EXPERTS, SLOTS = 2, 6, 10


def weights_for(p2l: torch.Tensor, width: int = 40) -> list[list[torch.Tensor]]:
    """Expert weights laid out as ``p2l`` says: slot p holds expert p2l[p]'s rows."""
    g = torch.Generator().manual_seed(0)
    experts = [torch.randn(EXPERTS, width, generator=g), torch.randn(EXPERTS, 3, generator=g)]
    return [[w[p2l[layer]].clone() for w in experts] for layer in range(p2l.shape[0])]


@settings(max_examples=40, deadline=None)
@given(
    old=placement_maps(LAYERS, EXPERTS, SLOTS),
    new=placement_maps(LAYERS, EXPERTS, SLOTS),
)
def test_undo_restores_every_written_slot_exactly(old: torch.Tensor, new: torch.Tensor) -> None:
    weights = weights_for(old)
    before = [[w.clone() for w in layer] for layer in weights]
    staged = stage_transfer(plan_transfer(old, new, SLOTS, 0), weights)
    undo = UndoRows.capture(staged, old)
    staged.commit()
    assert all(
        torch.equal(w, e)
        for layer, exp in zip(weights, weights_for(new), strict=True)
        for w, e in zip(layer, exp, strict=True)
    )
    undo.restore()
    assert all(
        torch.equal(w, b)
        for layer, was in zip(weights, before, strict=True)
        for w, b in zip(layer, was, strict=True)
    )
    # Only experts the layer drops entirely had to be copied.
    dropped = sum(
        len(set(old[layer].tolist()) - set(new[layer].tolist())) for layer in range(LAYERS)
    )
    assert undo.bytes_copied <= dropped * SLOTS * (40 + 3) * 4


@settings(max_examples=40, deadline=None)
@given(old=placement_maps(LAYERS, EXPERTS, SLOTS))
def test_the_table_gives_every_slot_the_fingerprint_of_its_expert(old: torch.Tensor) -> None:
    weights = weights_for(old)
    digests = torch.stack([row_digests(layer) for layer in weights])
    table = build_table("m", digests, old, EXPERTS, SLOTS)
    assert torch.equal(table.gather(1, old), digests)
    # Distinct experts have distinct fingerprints (random weights).
    assert all(len(set(row.tolist())) == EXPERTS for row in table)


@given(st.integers(1, 3 * SAMPLED_WORDS), st.integers(0, 10**6))
@settings(max_examples=30, deadline=None)
def test_a_changed_word_changes_the_full_fingerprint(width: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(-(2**31), 2**31 - 1, (2, width), dtype=torch.int64, generator=g)
    rows = rows.to(torch.int32)
    rows[1] = rows[0]
    position = seed % width
    rows[1, position] ^= 1 << (seed % 31)
    full = row_digests([rows], mode="full")
    assert full[0] != full[1]


def test_sampled_fingerprints_of_a_long_row_read_a_bounded_sample() -> None:
    rows = torch.zeros(2, 64 * SAMPLED_WORDS, dtype=torch.int32)
    rows[1, 1] = 7  # inside the first sampled block
    sampled = row_digests([rows])
    assert sampled[0] != sampled[1]
    rows[1, 1] = 0
    rows[1, 20 * SAMPLED_WORDS + 3] = 7  # between two blocks: only "full" sees it
    assert row_digests([rows])[0] == row_digests([rows])[1]
    assert row_digests([rows], mode="full")[0] != row_digests([rows], mode="full")[1]


def test_reordered_and_swapped_rows_change_the_fingerprint() -> None:
    row = torch.arange(12, dtype=torch.float32).reshape(1, 12)
    swapped = row[:, torch.tensor([1, 0, *range(2, 12)])]
    assert row_digests([row])[0] != row_digests([swapped])[0]
    other = torch.cat([row, row.flip(1)])
    assert row_digests([other])[0] != row_digests([other])[1]


def test_weights_that_do_not_alias_pass_the_aliasing_check() -> None:
    assert aliasing_problem(weights_for(torch.arange(SLOTS).remainder(EXPERTS)[None])) is None
    transposed = torch.randn(4, 5, 6).transpose(1, 2)
    assert aliasing_problem([[transposed]]) is None


def test_interleaved_halves_of_one_fused_weight_do_not_alias() -> None:
    fused = torch.randn(4, 6, 3)  # [slots, 2 * intermediate, hidden]: gate and up
    assert aliasing_problem([[fused[:, :3], fused[:, 3:]]]) is None
    assert aliasing_problem([[fused[..., :2], fused[..., 1:]]]) is not None  # column 1 twice
    flat = torch.randn(4 * 6)
    evens, odds = flat[0::2].view(4, 3), flat[1::2].view(4, 3)
    assert aliasing_problem([[evens], [odds]]) is None
    assert aliasing_problem([[flat[:12].view(4, 3)], [flat[9:21].view(4, 3)]]) is not None
