"""The serving simulator of ``benchmarks/bench_serving.py``: its figures rest on the cost model.

The cost model is checked on a case worked by hand; the simulation on a
small shape keeps its own books (totals add up, nothing moves without a
rebalance, dispatch never makes a step slower), and the NumPy port of vLLM's
policy that the time goal is measured against places experts as ours does.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from benchmark_modules import load_benchmark

from moe_protocols.eplb import refetched_per_rank, slots_refetched
from moe_protocols.eplb.policies import DeepSeekPolicy
from moe_protocols.eplb.workloads import Drift, LoadDistribution, MoEShape, drift_sequence


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bench_serving")


def test_cost_model_on_a_hand_worked_case(bench: ModuleType) -> None:
    cost = bench.CostModel(
        step_seconds=0.1,
        moe_share=0.5,
        steps_per_window=100,
        rank_bandwidth=1e9,
        blocking=True,
        overlap_penalty=0.1,
        dispatch_seconds=0.001,
        lagged_seconds=0.004,
        routing_seconds=0.0005,
    )
    # One step, two layers, two ranks: peaks 3 + 2 = 5 over means 2 + 2 = 4, imbalance 1.25,
    # so the step takes 0.1 * (0.5 + 0.5 * 1.25) = 0.1125 s; per-step dispatch adds 2 layers x 1 ms.
    rank_load = torch.tensor([[[3.0, 1.0], [2.0, 2.0]]])
    assert float(cost.step_times(rank_load)[0]) == pytest.approx(0.1125)
    assert float(cost.step_times(rank_load, dispatch="per-step")[0]) == pytest.approx(0.1145)
    # Lagged: one 4 ms solve per step plus 0.5 ms of routing in each of the 2 layers.
    assert float(cost.step_times(rank_load, dispatch="lagged")[0]) == pytest.approx(0.1175)
    assert cost.window_seconds(cost.step_times(rank_load)) == pytest.approx(11.25)
    # Refetched slots per (layer, rank): rank 0 receives 1 + 2 = 3 slots of 100 MB at 1 GB/s.
    fetched = torch.tensor([[1, 0], [2, 1]])
    assert cost.transfer_seconds(fetched, 100_000_000) == pytest.approx(0.3)
    assert cost.stall_seconds(0.3, 0.05) == pytest.approx(0.35)
    overlapped = bench.CostModel(blocking=False, overlap_penalty=0.1)
    assert overlapped.stall_seconds(0.3, 0.05) == pytest.approx(0.03)
    # A perfectly balanced step costs exactly step_seconds.
    assert float(cost.step_times(torch.ones(1, 3, 4))[0]) == pytest.approx(0.1)


def test_refetched_per_rank_counts_what_each_rank_receives() -> None:
    old = torch.tensor([[0, 1, 2, 3]])
    new = torch.tensor([[1, 0, 2, 0]])  # rank 0 reorders only; rank 1 fetches a second 0
    assert refetched_per_rank(old, new, 2).tolist() == [[0, 1]]
    assert slots_refetched(old, new, 2) == 1


SMALL = MoEShape(
    name="small",
    num_layers=3,
    num_logical=8,
    num_groups=2,
    num_physical=12,
    num_ranks=4,
    num_nodes=2,
    expert_bytes=1_000_000,
)


def test_a_small_simulation_keeps_its_books(bench: ModuleType) -> None:
    settings = bench.Settings(num_windows=4, steps_per_window=2, tokens_per_step=256, top_k=2)
    cost = bench.CostModel()
    for process in bench.PROCESSES:
        runs = bench.simulate(SMALL, process, settings, cost)
        assert set(runs) == {"off", "deepseek", "migration_aware", "oracle"}
        assert runs["off"].refetched == []
        assert runs["off"].stall == 0.0
        for name, run in runs.items():
            assert len(run.window_seconds) == settings.num_windows
            assert run.total == pytest.approx(sum(run.window_seconds) + run.stall)
            if name in ("off", "oracle"):  # references: no dispatch figures
                assert run.step_bal_dispatch == []
                continue
            # Dispatch never lowers a step's balancedness (its shares never raise a peak).
            for plain, dispatched in zip(run.step_bal, run.step_bal_dispatch, strict=True):
                assert dispatched >= plain - 1e-6
            assert run.duplicates >= 0
        assert runs["migration_aware"].duplicates == 0
        assert len(runs["deepseek"].refetched) == settings.num_windows - 1


@pytest.mark.parametrize("shape", [SMALL, SMALL.as_global()], ids=["hierarchical", "global"])
def test_the_numpy_port_of_vllms_policy_places_as_deepseek_does(
    bench: ModuleType, shape: MoEShape
) -> None:
    args = (shape.num_physical, shape.num_groups, shape.num_nodes, shape.num_ranks)
    w0 = LoadDistribution("zipf", 1.1).sample(shape.num_layers, shape.num_logical, seed=5)
    w1 = drift_sequence(w0, Drift("lognormal", 0.2), 1, seed=6)[1]
    ours = DeepSeekPolicy().rebalance_experts(w0, *args)
    assert torch.equal(bench.vllm_default_numpy(w0, *args), ours)
    again = DeepSeekPolicy().rebalance_experts(w1, *args, ours)
    assert torch.equal(bench.vllm_default_numpy(w1, *args, ours), again)
