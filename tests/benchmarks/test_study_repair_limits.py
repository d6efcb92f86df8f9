"""The idealised repair of ``benchmarks/study_repair_limits.py``: the study's figures rest on it.

Its placements must be valid (every expert placed, none twice on a rank), end
within the target unless it says it stalled, and move nothing it need not.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
import torch
from benchmark_modules import load_benchmark

from moe_protocols.eplb._metrics import expected_rank_loads
from moe_protocols.eplb.analysis import max_rank_load_lower_bound
from moe_protocols.eplb.policies import MigrationAwarePolicy
from moe_protocols.eplb.workloads import Drift, LoadDistribution, drift_sequence


@pytest.fixture(scope="module")
def study() -> ModuleType:
    return load_benchmark("study_repair_limits")


def _rank_loads(weight: np.ndarray, slots: np.ndarray, num_ranks: int) -> np.ndarray:
    placement = torch.from_numpy(slots).unsqueeze(0)
    return expected_rank_loads(placement, torch.from_numpy(weight).unsqueeze(0), num_ranks)[
        0
    ].numpy()


def test_one_retarget_fixes_what_no_swap_can(study: ModuleType) -> None:
    # Ranks [0, 1] and [2, 0] carry 1 + 3 = 4 and 1 + 1 = 2. The only swap
    # allowed (expert 1 for expert 2) gives 2 and 4, but re-pointing one copy
    # of expert 0 (to expert 1 or 2) gives 3.5 and 2.5 by changing one slot.
    weight = np.array([2.0, 3.0, 1.0])
    old = np.array([0, 1, 2, 0])
    new, stalled = study.repair_layer(weight, old, 2, limit=3.5)
    assert not stalled
    assert int((new != old).sum()) == 1
    assert sorted(_rank_loads(weight, new, 2).tolist()) == [2.5, 3.5]


def test_an_unreachable_target_stalls_with_a_valid_placement(study: ModuleType) -> None:
    # 3.5 is the best peak without two replicas of expert 1 on one rank.
    weight = np.array([2.0, 3.0, 1.0])
    new, stalled = study.repair_layer(weight, np.array([0, 1, 2, 0]), 2, limit=3.0)
    assert stalled
    assert _rank_loads(weight, new, 2).max() == pytest.approx(3.5)


def test_a_placement_already_within_the_target_is_kept(study: ModuleType) -> None:
    weight = np.array([2.0, 3.0, 1.0])
    old = np.array([0, 1, 2, 0])
    new, stalled = study.repair_layer(weight, old, 2, limit=4.0)
    assert not stalled
    assert new.tolist() == old.tolist()


def test_a_duplicate_in_the_old_placement_is_refused(study: ModuleType) -> None:
    with pytest.raises(ValueError, match="twice"):
        study.repair_layer(np.array([1.0, 1.0]), np.array([0, 0, 1, 1]), 2, limit=1.0)


def test_a_missing_expert_is_refused(study: ModuleType) -> None:
    with pytest.raises(ValueError, match="misses"):
        study.repair_layer(np.array([1.0, 1.0, 1.0]), np.array([0, 1, 1, 0]), 2, limit=1.0)


def test_running_out_of_moves_counts_as_a_stall(study: ModuleType) -> None:
    weight = np.array([2.0, 3.0, 1.0])
    _, stalled = study.repair_layer(weight, np.array([0, 1, 2, 0]), 2, limit=3.5, max_moves=0)
    assert stalled


@pytest.mark.parametrize("seed", [3, 11])
def test_drifted_layers_come_back_valid_and_within_target(study: ModuleType, seed: int) -> None:
    num_ranks, num_slots, num_experts = 8, 40, 32
    windows = drift_sequence(
        LoadDistribution("lognormal", 1.0).sample(2, num_experts, seed=seed),
        Drift("lognormal", 0.2),
        1,
        seed=seed + 1,
    )
    old = MigrationAwarePolicy().rebalance_experts(windows[0], num_slots, 1, 1, num_ranks)
    bound = max_rank_load_lower_bound(windows[1], num_slots, num_ranks)
    for layer in range(2):
        weight = windows[1][layer].numpy()
        limit = 1.01 * float(bound[layer])
        before = _rank_loads(weight, old[layer].numpy(), num_ranks)
        new, stalled = study.repair_layer(weight, old[layer].numpy(), num_ranks, limit)
        # Every expert placed, none twice on one rank.
        assert set(new.tolist()) == set(range(num_experts))
        by_rank = torch.from_numpy(new).view(num_ranks, -1)
        assert all(len(set(row.tolist())) == row.numel() for row in by_rank)
        after = _rank_loads(weight, new, num_ranks)
        if not stalled:
            assert after.max() <= limit * (1 + 1e-9)
        # The total excess over the limit never grows.
        assert np.maximum(after - limit, 0).sum() <= np.maximum(before - limit, 0).sum() + 1e-9
