"""Our DeepSeek policy and bench_serving's NumPy port place exactly as vLLM 0.33's own policy.

Two claims rest on this. ``DeepSeekPolicy`` is offered as vLLM's default
policy (the same placement for the same load), and ``benchmarks/bench_serving.py``
times and simulates vLLM through a NumPy port where vLLM is not installed, so
its figures are only vLLM's if the port places as vLLM does. Both are checked
here against ``vllm.distributed.eplb.policy.default.DefaultEplbPolicy`` on
seeded loads: hierarchical and global shapes, fresh plans and plans that
preserve slots of an old placement, smooth and heavy-tailed loads.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_protocols.eplb import DeepSeekPolicy
from moe_protocols.eplb.workloads import Drift, LoadDistribution, drift_sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for benchmark_modules
from benchmark_modules import load_benchmark

pytestmark = pytest.mark.vllm

# (logical experts, physical slots, groups, nodes, ranks): hierarchical when
# groups % nodes == 0, else vLLM falls back to one global group.
SHAPES = [
    (16, 20, 4, 2, 4),
    (32, 48, 8, 2, 8),
    (64, 80, 8, 1, 8),
    (24, 32, 3, 2, 4),  # 3 groups on 2 nodes: global
    (40, 64, 5, 2, 8),  # global
]
LOADS = [LoadDistribution("lognormal", 1.0), LoadDistribution("zipf", 1.1)]


def _vllm_policy() -> Callable[..., torch.Tensor]:
    module = importlib.import_module("vllm.distributed.eplb.policy.default")
    rebalance: Callable[..., torch.Tensor] = module.DefaultEplbPolicy.rebalance_experts
    return rebalance


def _cases(integer: bool) -> list[tuple[Any, ...]]:
    cases: list[tuple[Any, ...]] = []
    for shape in SHAPES:
        for dist in LOADS:
            for seed in (3, 17):
                first = dist.sample(6, shape[0], seed=seed)
                second = drift_sequence(first, Drift("lognormal", 0.3), 1, seed=seed + 1)[1]
                if integer:  # token counts, as the runner records them
                    first = first.round()
                    second = second.round()
                cases.append((shape, dist.name, seed, first, second))
    return cases


@pytest.mark.parametrize("case", _cases(integer=False), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_bench_serving_port_places_as_vllm(case: tuple[Any, ...]) -> None:
    """The port bench_serving uses without vLLM gives vLLM's placement, fresh and preserving."""
    (_logical, physical, groups, nodes, ranks), _, _, first, second = case
    port = load_benchmark("bench_serving").vllm_default_numpy
    real = _vllm_policy()
    args = (physical, groups, nodes, ranks)
    old = real(first, *args)
    assert old.shape == (first.shape[0], physical)
    torch.testing.assert_close(port(first, *args), old, rtol=0, atol=0)
    torch.testing.assert_close(port(second, *args, old), real(second, *args, old), rtol=0, atol=0)


@pytest.mark.parametrize("case", _cases(integer=True), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_deepseek_policy_places_as_vllms_default(case: tuple[Any, ...]) -> None:
    """On integer token counts (exact in float32 and float64) ours is vLLM's placement."""
    (_logical, physical, groups, nodes, ranks), _, _, first, second = case
    ours, real = DeepSeekPolicy(), _vllm_policy()
    args = (physical, groups, nodes, ranks)
    old = real(first, *args)
    torch.testing.assert_close(ours.rebalance_experts(first, *args), old, rtol=0, atol=0)
    torch.testing.assert_close(
        ours.rebalance_experts(second, *args, old), real(second, *args, old), rtol=0, atol=0
    )
