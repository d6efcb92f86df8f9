"""EPLB across real processes (gloo on loopback), and the cross-rank planning it relies on.

The ``distributed`` tests spawn one group of 2 and one of 4 processes (see
``_distributed_workers.py``); each group runs several checks and the parent
compares what every rank recorded with a single-process reference.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _distributed_workers import (
    NUM_EXPERTS,
    NUM_MOE_LAYERS,
    NUM_PHYSICAL,
    NUM_REDUNDANT,
    STEP_INTERVAL,
    RankResult,
    build_model,
    dummy_step_of,
    eplb_config,
    initial_map,
    rank_load,
    run_group,
    shuffled_placement,
    tokens,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import placement_maps

from moe_protocols.adapters import MoEView
from moe_protocols.eplb import (
    EplbConfig,
    EplbState,
    TransferJob,
    TransferOptions,
    _distributed,
    plan_transfer,
    remote_fetches_required,
)
from moe_protocols.errors import EplbConfigError
from moe_protocols.models import TinyMoEForCausalLM, tiny_vlm
from moe_protocols.parallel import ExpertParallelContext

# --------------------------------------------------------------------------- references


def reference_model() -> TinyMoEForCausalLM:
    """The same model in one process: all ``P`` slots, initial placement."""
    return build_model()


def expert_rows(model: TinyMoEForCausalLM) -> list[list[torch.Tensor]]:
    """Per layer, the ``[P, ...]`` rows of the initial placement (row ``e < E``: expert e)."""
    return [[w.clone() for w in block.get_expert_weights()] for block in model.moe_layers]


def minimum_rows(old: torch.Tensor, new: torch.Tensor, world: int) -> int:
    """Rows that must cross ranks: per (layer, rank), experts held after but not before."""
    local = old.shape[1] // world
    return sum(
        len(
            set(new[layer, r * local : (r + 1) * local].tolist())
            - set(old[layer, r * local : (r + 1) * local].tolist())
        )
        for layer in range(old.shape[0])
        for r in range(world)
    )


def single_process_rearrangement(world: int, num_nodes: int) -> torch.Tensor:
    """The placement a single process computes from the load every rank recorded."""
    window = (STEP_INTERVAL - 1) * torch.stack([rank_load(r) for r in range(world)]).sum(dim=0)
    state = EplbState(eplb_config(), num_ranks=world, num_nodes=num_nodes)
    state.add_model(reference_model())
    state.model_state().expert_load_pass.copy_(window)
    state.step()
    state.rearrange()
    return state.physical_to_logical_map()


def rank_weights(result: RankResult, key: str) -> list[list[torch.Tensor]]:
    return [
        [result.tensors[f"{key}.w{layer}.{k}"] for k in range(2)] for layer in range(NUM_MOE_LAYERS)
    ]


def assert_weights_follow(results: list[RankResult], key: str, placement: torch.Tensor) -> None:
    """Every rank's slot holds the single-process weights of the expert ``placement`` puts there."""
    rows = expert_rows(reference_model())
    local = NUM_PHYSICAL // len(results)
    for result in results:
        slots = slice(result.rank * local, (result.rank + 1) * local)
        for layer, weights in enumerate(rank_weights(result, key)):
            experts = placement[layer, slots]
            for k, w in enumerate(weights):
                assert torch.equal(w, rows[layer][k][experts]), (result.rank, layer, k)


# --------------------------------------------------------------------------- group runs


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> list[RankResult]:
    """2 ranks, default transfer options (one batch per layer, staged next to the weights)."""
    return run_group("two_ranks", 2, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> list[RankResult]:
    """4 ranks on 2 nodes, one-row batches staged in host memory, a failing and a hung rank."""
    return run_group("four_ranks", 4, tmp_path_factory.mktemp("four"))


@pytest.fixture(params=[2, 4], ids=["2-ranks", "4-ranks"])
def group(request: pytest.FixtureRequest) -> list[RankResult]:
    """Each group run in turn (spawned once per module)."""
    results: list[RankResult] = request.getfixturevalue("two" if request.param == 2 else "four")
    return results


@pytest.mark.distributed
def test_load_recorded_by_the_ep_group_sums_to_what_one_process_records(
    two: list[RankResult],
) -> None:
    # Every rank sees every token; each must count only the pairs its own slots
    # serve, or the all-reduced window would be world_size times the real load.
    state = EplbState(eplb_config(), num_ranks=2)
    model = reference_model()
    state.add_model(model)
    with torch.no_grad():
        model(tokens())
    expected = state.model_state().expert_load_pass
    assert int(expected.sum()) > 0
    local = NUM_PHYSICAL // 2
    for result in two:
        assert torch.equal(result.tensors["forward.load_sum"], expected)
        own = result.tensors["forward.load"]
        others = torch.ones(NUM_PHYSICAL, dtype=torch.bool)
        others[result.rank * local : (result.rank + 1) * local] = False
        assert int(own[:, others].abs().sum()) == 0


@pytest.mark.distributed
def test_every_rank_rearranges_at_the_same_step_whatever_its_dummy_steps(
    group: list[RankResult],
) -> None:
    assert len({dummy_step_of(r.rank) for r in group}) > 1  # the schedules do differ
    for result in group:
        counts = [result.values[f"rearrangements_after_step{s}"] for s in range(STEP_INTERVAL)]
        assert counts == [0] * (STEP_INTERVAL - 1) + [1]
        assert result.values["steps_taken"] == STEP_INTERVAL


@pytest.mark.distributed
def test_every_rank_adopts_the_placement_a_single_process_computes(
    group: list[RankResult],
) -> None:
    world = len(group)
    expected = single_process_rearrangement(world, num_nodes=1 if world == 2 else 2)
    assert not torch.equal(expected, initial_map())  # the load really moves experts
    for result in group:
        assert torch.equal(result.tensors["rearranged.old_map"], initial_map())
        assert torch.equal(result.tensors["rearranged.new_map"], expected)
        assert torch.equal(result.tensors["rearranged.live_map"], expected)


@pytest.mark.distributed
def test_each_rank_holds_the_single_process_weights_of_its_slots(
    group: list[RankResult],
) -> None:
    placement = group[0].tensors["rearranged.new_map"]
    assert_weights_follow(group, "rearranged", placement)
    assert_weights_follow(group, "restored", shuffled_placement(seed=3))


@pytest.mark.distributed
def test_outputs_of_the_ep_group_do_not_change_when_experts_move(
    group: list[RankResult],
) -> None:
    with torch.no_grad():
        expected = reference_model()(tokens())
    for result in group:
        for key in ("initial", "rearranged", "restored"):
            assert torch.equal(result.tensors[f"{key}.logits"], expected), (result.rank, key)


@pytest.mark.distributed
def test_balanced_dispatch_moves_tokens_between_replicas_without_changing_outputs(
    two: list[RankResult],
) -> None:
    with torch.no_grad():
        expected = reference_model()(tokens())
    for result in two:
        assert torch.equal(result.tensors["dispatched.logits"], expected), result.rank
        modulo, dispatched = result.tensors["modulo.load"], result.tensors["dispatched.load"]
        # Same tokens per layer, served by other replicas; the busiest rank is no busier
        # than under the modulo rule, up to the rounding of each replica's share (one token).
        assert torch.equal(modulo.sum(dim=1), dispatched.sum(dim=1))
        assert not torch.equal(modulo, dispatched)
        slots = modulo.shape[1] // 2
        modulo_peak = modulo.view(-1, 2, slots).sum(dim=2).amax(dim=1)
        dispatched_peak = dispatched.view(-1, 2, slots).sum(dim=2).amax(dim=1)
        assert bool((dispatched_peak <= modulo_peak + slots).all())


@pytest.mark.distributed
def test_only_the_minimum_crosses_ranks_one_row_per_missing_expert(
    group: list[RankResult],
) -> None:
    world = len(group)
    old, new = group[0].tensors["rearranged.old_map"], group[0].tensors["rearranged.new_map"]
    row_bytes = sum(
        w[0].numel() * w.element_size()
        for w in reference_model().moe_layers[0].get_expert_weights()
    )
    rows = minimum_rows(old, new, world)
    assert rows > 0
    assert rows == remote_fetches_required(old, new, NUM_PHYSICAL // world)
    sent = sum(int(r.values["bytes_sent"]) for r in group)  # type: ignore[call-overload]  # JSON values are typed object
    received = sum(int(r.values["bytes_received"]) for r in group)  # type: ignore[call-overload]  # JSON values are typed object
    assert sent == received == rows * row_bytes


@pytest.mark.distributed
def test_ranks_given_different_placements_refuse_them_and_keep_their_state(
    two: list[RankResult],
) -> None:
    for result in two:
        error = result.values["different_placements"]
        assert isinstance(error, dict)
        assert error["type"] == "MappingError"
        assert "different placements" in error["message"]
        assert result.values["different_placements.changed"] == []


@pytest.mark.distributed
def test_a_policy_that_differs_across_ranks_is_caught_before_anything_moves(
    two: list[RankResult],
) -> None:
    for result in two:
        error = result.values["nondeterministic_policy"]
        assert isinstance(error, dict)
        assert error["type"] == "EplbStateError"
        assert "the placements their policies computed" in error["message"]
        assert "registered models" not in error["message"]
        assert result.values["nondeterministic_policy.changed"] == []


@pytest.mark.distributed
def test_ranks_out_of_lockstep_refuse_to_rearrange(two: list[RankResult]) -> None:
    for result in two:
        error = result.values["out_of_lockstep"]
        assert isinstance(error, dict)
        assert error["type"] == "EplbStateError"
        assert "lockstep" in error["message"]
        assert f"between {STEP_INTERVAL} and {STEP_INTERVAL + 1} step() calls" in error["message"]
        assert "rearrangements" not in error["message"]
        assert result.values["out_of_lockstep.changed"] == []


def test_a_rank_whose_replica_diverged_is_named_by_every_rank(two: list[RankResult]) -> None:
    for result in two:
        error = result.values["diverged_replica"]
        assert isinstance(error, dict)
        assert error["type"] == "EplbStateError"
        assert "MoE layer 0" in error["message"]
        assert "(EP rank 1)" in error["message"]
        assert result.values["diverged_replica.changed"] == []


def test_ranks_with_other_layer_counts_are_named_before_any_collective_of_their_size(
    two: list[RankResult],
) -> None:
    for result in two:
        error = result.values["mismatched_layers"]
        assert isinstance(error, dict)
        assert error["type"] == "EplbStateError"
        assert error["message"].startswith("EP ranks 1 registered other models")
        layers = 3 if result.rank == 0 else 5
        assert f"{layers} MoE layers" in error["message"]
        assert result.values["mismatched_layers.changed"] == []


@pytest.mark.distributed
def test_four_ranks_of_which_two_differ_all_raise_the_same_error_naming_both(
    four: list[RankResult],
) -> None:
    for result in four:  # every rank exited 0 (run_group checks): none died by signal
        error = result.values["mismatched_layers"]
        assert isinstance(error, dict)
        assert error["type"] == "EplbStateError"
        assert error["message"].startswith("EP ranks 2, 3 registered other models")
        layers = {2: 5, 3: 6}.get(result.rank, 3)
        assert f"EP rank {result.rank} has: model 'model': {layers} MoE layers" in error["message"]
        assert result.values["mismatched_layers.changed"] == []


@pytest.mark.distributed
def test_a_rank_failing_mid_transfer_leaves_every_rank_as_it_was_and_is_named(
    four: list[RankResult],
) -> None:
    for result in four:
        error = result.values["injected_failure"]
        assert isinstance(error, dict)
        assert error["type"] == "TransferError"
        assert (error["rank"], error["layer"]) == (2, 1)
        assert "failed on EP rank 2 at MoE layer 1" in error["message"]
        assert ("injected failure" in error["message"]) == (result.rank == 2)
        assert result.values["injected_failure.changed"] == []
    # ...and the same move then succeeds on the same group (checked by the weight test).


@pytest.mark.distributed
def test_a_hung_peer_makes_the_others_time_out_and_keep_their_state(
    four: list[RankResult],
) -> None:
    for result in four:
        error = result.values["hung_peer"]
        assert isinstance(error, dict)
        assert error["type"] == "TransferTimeoutError"
        assert error["phase"] == "exchange"
        if result.rank == 1:  # the hung rank: every other rank reported in before it
            assert (error["missing_ranks"], error["rank"]) == ([], None)
            assert "this rank is the one that fell" in error["message"]
        else:
            assert (error["missing_ranks"], error["rank"]) == ([1], 1)
            assert "EP rank 1 did not arrive in the exchange phase" in error["message"]
        assert result.values["hung_peer.changed"] == []
        assert result.values["default_group_after_hang"] == 4.0
    # Every rank names the batch it stopped at: the one holding layer 1, or an earlier one.
    layers = {result.values["hung_peer"]["layer"] for result in four}  # type: ignore[index]  # JSON values are typed object
    assert len(layers) == 1
    assert layers <= {0, 1}


# --------------------------------------------------------------------------- planning (in-process)


@st.composite
def placement_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    world = draw(st.sampled_from([2, 3, 4]))
    nodes = draw(st.sampled_from([n for n in (1, 2) if world % n == 0]))
    num_logical = draw(st.integers(1, 8))
    local = draw(st.integers(max(1, -(-num_logical // world)), 4))
    num_physical = world * local
    num_layers = draw(st.integers(1, 3))

    maps = placement_maps(num_layers, num_logical, num_physical)

    return draw(maps), draw(maps), world, nodes


@settings(max_examples=80, deadline=None)
@given(placement_pairs())
def test_cross_rank_plans_agree_move_the_minimum_and_fill_every_slot(
    case: tuple[torch.Tensor, torch.Tensor, int, int],
) -> None:
    old, new, world, nodes = case
    local = old.shape[1] // world
    plans = [plan_transfer(old, new, local, rank, num_nodes=nodes) for rank in range(world)]
    # Every rank plans the same group-wide transfers.
    assert len({tuple(layer.transfers for layer in p.layers) for p in plans}) == 1
    transfers = [t for layer in plans[0].layers for t in layer.transfers]
    assert len(transfers) == minimum_rows(old, new, world)
    # Simulate the exchange: each slot reads its source's old row (rank, slot -> expert id).
    for layer in range(old.shape[0]):
        for t in plans[0].layers[layer].transfers:
            assert int(old[layer, t.source_rank * local + t.source_slot]) == t.expert
            assert (
                t.expert
                not in old[layer, t.destination_rank * local : (t.destination_rank + 1) * local]
            )
        for rank, plan in enumerate(plans):
            after = old[layer, rank * local : (rank + 1) * local].clone()
            for copy in plan.layers[layer].copies:
                after[copy.destination] = old[layer, copy.source_rank * local + copy.source_slot]
            assert torch.equal(after, new[layer, rank * local : (rank + 1) * local])


@settings(max_examples=60, deadline=None)
@given(placement_pairs(), st.integers(1, 5))
def test_batches_carry_every_row_once_within_the_budget_and_prepare_layers_first(
    case: tuple[torch.Tensor, torch.Tensor, int, int], budget_rows: int
) -> None:
    old, new, world, nodes = case
    local = old.shape[1] // world
    row_bytes = 16
    weights = [[torch.zeros(local, row_bytes, dtype=torch.uint8)] for _ in range(old.shape[0])]
    plan = plan_transfer(old, new, local, 0, num_nodes=nodes)
    steps = [_distributed._Step(0, layer) for layer in range(old.shape[0])]
    job = TransferJob("model", plan, weights)
    batches = _distributed._plan_batches(steps, [job], [budget_rows * row_bytes])
    carried = [(step, t) for batch in batches for step, part in batch.parts for t in part]
    expected = [(layer.layer, t) for layer in plan.layers for t in layer.transfers]
    assert sorted(carried, key=repr) == sorted(expected, key=repr)
    assert sorted(s for batch in batches for s in batch.new_steps) == list(range(len(steps)))
    prepared: set[int] = set()
    for batch in batches:
        prepared.update(batch.new_steps)
        assert {step for step, _ in batch.parts} <= prepared
        received: dict[int, int] = {}
        for _, part in batch.parts:
            for t in part:
                received[t.destination_rank] = received.get(t.destination_rank, 0) + 1
        assert max(received.values(), default=0) <= budget_rows


def test_receivers_of_one_expert_are_spread_over_its_holders() -> None:
    # 6 ranks of 2 slots; expert 0 is on ranks 0 and 1; ranks 2..5 each need it.
    old = torch.tensor([[0, 1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    new = torch.tensor([[0, 1, 0, 2, 0, 4, 0, 6, 0, 8, 0, 10]])
    plan = plan_transfer(old, new, 2, 0)
    senders = [t.source_rank for t in plan.layers[0].transfers]
    assert sorted(senders) == [0, 0, 1, 1]


def test_a_holder_on_the_receivers_node_is_preferred() -> None:
    # 4 ranks of 2 slots on 2 nodes; expert 0 is on rank 0 (node 0) and rank 3 (node 1).
    old = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 6]])
    new = torch.tensor([[0, 1, 0, 3, 0, 5, 0, 6]])
    plan = plan_transfer(old, new, 2, 0, num_nodes=2)
    by_receiver = {t.destination_rank: t.source_rank for t in plan.layers[0].transfers}
    assert by_receiver == {1: 0, 2: 3}


def test_duplicates_of_a_missing_expert_are_received_once() -> None:
    # 2 ranks of 2 slots; rank 0 wants expert 3 (only on rank 1) in both its slots.
    old = torch.tensor([[0, 1, 2, 3]])
    new = torch.tensor([[3, 3, 2, 1]])
    plan = plan_transfer(old, new, 2, 0)
    assert len(plan.layers[0].receives) == 1
    assert len(plan.layers[0].remote_copies) == 2


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"buffer_bytes": 0}, "buffer_bytes"),
        ({"buffer_bytes": True}, "buffer_bytes"),
        ({"staging_device": "no-such-device"}, "staging_device"),
        ({"fault_hook": 3}, "fault_hook"),
    ],
)
def test_bad_transfer_options_are_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(EplbConfigError, match=message):
        TransferOptions(**kwargs)  # type: ignore[arg-type]  # deliberately wrong values


def test_a_buffer_smaller_than_one_expert_row_is_rejected_at_registration() -> None:
    ep = ExpertParallelContext(world_size=2, rank=0)  # no collective runs while registering
    state = EplbState(
        EplbConfig(num_redundant_experts=NUM_REDUNDANT),
        ep=ep,
        transfer=TransferOptions(buffer_bytes=64),
    )
    with pytest.raises(EplbConfigError, match="cannot hold one expert row"):
        state.add_model(build_model(ep))
    assert state.model_names == ()


# --------------------------------------------------------------------------- elastic EP


def test_elastic_metadata_update_through_the_view_reaches_the_language_model_in_a_vlm() -> None:
    # Scale from 2 to 4 EP ranks: every rank keeps its slots, the group has twice as many.
    ep = ExpertParallelContext(world_size=2, rank=1)
    vlm = tiny_vlm(ep=ep, num_experts=NUM_EXPERTS, num_redundant_experts=NUM_REDUNDANT)
    assert not hasattr(vlm, "update_physical_experts_metadata")  # what vLLM 0.33 calls: absent
    view = MoEView.require(vlm)
    local = view.num_local_physical_experts
    view.update_physical_experts_metadata(
        num_physical_experts=4 * local, num_local_physical_experts=local
    )
    lm = vlm.get_language_model()
    assert (lm.num_physical_experts, lm.num_redundant_experts) == (
        4 * local,
        4 * local - NUM_EXPERTS,
    )
    # The view registers with an EPLB state sized for the larger group: the LM's
    # layers accept load and map tensors of the new slot count.
    bigger = ExpertParallelContext(world_size=4, rank=1)
    state = EplbState(EplbConfig(num_redundant_experts=4 * local - NUM_EXPERTS), ep=bigger)
    state.add_model(view)
    assert state.model_state().num_physical_experts == 4 * local
    assert state.model_state().expert_load_pass.shape == (NUM_MOE_LAYERS, 4 * local)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "model",
    [[], ["--model", "own", "--redundant", "2"]],
    ids=["tiny-vlm", "own-moe-vlm-example"],
)
def test_the_distributed_example_balances_two_ranks_and_keeps_outputs(model: list[str]) -> None:
    """The built-in tiny VLM, and examples/own_moe_vlm.py built from moe_protocols.building."""
    example = Path(__file__).resolve().parents[2] / "examples" / "distributed_eplb.py"
    done = subprocess.run(
        [sys.executable, str(example), "--ranks", "2", "--steps", "16", *model],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "2 rearrangements on 2 EP ranks" in done.stdout
    assert "outputs bit-identical after the moves: True" in done.stdout
    first = re.search(r"balancedness (\d\.\d+) -> (\d\.\d+)", done.stdout)
    assert first is not None, done.stdout
    assert float(first[2]) > float(first[1])
