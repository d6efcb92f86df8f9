"""Seeded load generators: shapes, distributions, drift and per-step sampling."""

from __future__ import annotations

import pytest
import torch

from moe_protocols.eplb.workloads import (
    DEEPSEEK_V3_288,
    DEEPSEEK_V3_320,
    QWEN3_235B,
    STANDARD_DISTRIBUTIONS,
    STANDARD_SHAPES,
    Drift,
    LoadDistribution,
    MoEShape,
    WorkloadError,
    drift_sequence,
    sample_step_loads,
)
from moe_protocols.errors import MoEProtocolsError


def hottest_over_mean(load: torch.Tensor) -> float:
    return float((load.amax(dim=1) / load.mean(dim=1)).mean())


def test_deepseek_and_qwen_shapes_match_their_deployments() -> None:
    assert (DEEPSEEK_V3_288.num_layers, DEEPSEEK_V3_288.num_logical) == (58, 256)
    assert (DEEPSEEK_V3_288.num_physical, DEEPSEEK_V3_288.num_ranks) == (288, 32)
    assert DEEPSEEK_V3_288.slots_per_rank == 9
    assert DEEPSEEK_V3_288.num_nodes == 4
    assert (DEEPSEEK_V3_320.num_physical, DEEPSEEK_V3_320.num_ranks) == (320, 64)
    assert DEEPSEEK_V3_320.num_nodes == 8
    assert (QWEN3_235B.num_layers, QWEN3_235B.num_logical, QWEN3_235B.num_groups) == (94, 128, 1)
    assert DEEPSEEK_V3_288.hierarchical
    assert DEEPSEEK_V3_320.hierarchical
    assert not QWEN3_235B.hierarchical
    flat = DEEPSEEK_V3_288.as_global()
    assert not flat.hierarchical
    assert flat.num_physical == 288
    assert flat.name.endswith("global")
    assert len({shape.name for shape in STANDARD_SHAPES}) == len(STANDARD_SHAPES)


def test_inconsistent_shapes_are_rejected() -> None:
    with pytest.raises(WorkloadError, match="multiple of num_ranks"):
        MoEShape("bad", 1, 8, 1, 10, 4, 1, expert_bytes=1)
    with pytest.raises(WorkloadError, match="num_nodes"):
        MoEShape("bad", 1, 8, 1, 8, 4, 3, expert_bytes=1)
    with pytest.raises(WorkloadError, match="num_layers"):
        MoEShape("bad", 0, 8, 1, 8, 4, 1, expert_bytes=1)
    assert issubclass(WorkloadError, MoEProtocolsError)


@pytest.mark.parametrize("dist", STANDARD_DISTRIBUTIONS, ids=lambda d: d.name)
def test_same_seed_gives_the_same_loads_and_totals_are_kept(dist: LoadDistribution) -> None:
    first = dist.sample(5, 64, seed=7, tokens_per_layer=1000.0)
    assert torch.equal(first, dist.sample(5, 64, seed=7, tokens_per_layer=1000.0))
    assert not torch.equal(first, dist.sample(5, 64, seed=8, tokens_per_layer=1000.0))
    assert first.shape == (5, 64)
    assert first.dtype == torch.float64
    assert bool((first >= 0).all())
    assert torch.allclose(first.sum(dim=1), torch.full((5,), 1000.0, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["lognormal", "zipf"])
def test_larger_spread_makes_the_hottest_expert_hotter(kind: str) -> None:
    spreads = (0.5, 1.0, 1.5) if kind == "lognormal" else (0.6, 0.8, 1.1)
    ratios = [
        hottest_over_mean(LoadDistribution(kind, s).sample(58, 256, seed=1))  # type: ignore[arg-type]  # kind is one of the literals
        for s in spreads
    ]
    assert ratios == sorted(ratios)
    assert ratios[0] > 2


def test_zipf_calibration_matches_the_research_note() -> None:
    # eplb.md 5.2: Zipf 0.6 / 1.1 over 256 experts -> hottest ~12 / ~53 x the mean.
    assert hottest_over_mean(
        LoadDistribution("zipf", 0.6).sample(58, 256, seed=1)
    ) == pytest.approx(12, rel=0.15)
    assert hottest_over_mean(
        LoadDistribution("zipf", 1.1).sample(58, 256, seed=1)
    ) == pytest.approx(53, rel=0.15)


def test_hotspot_puts_one_very_hot_expert_on_some_layers() -> None:
    load = LoadDistribution("hotspot", 15.0).sample(200, 256, seed=3)
    ratio = load.amax(dim=1) / load.mean(dim=1)
    hot_layers = ratio > 12
    assert 0.1 < float(hot_layers.double().mean()) < 0.4


def test_lognormal_drift_keeps_totals_and_moves_every_expert() -> None:
    start = LoadDistribution("lognormal", 1.0).sample(4, 32, seed=1)
    windows = drift_sequence(start, Drift("lognormal", 0.2), 3, seed=2)
    assert windows.shape == (4, 4, 32)
    assert torch.equal(windows[0], start)
    assert torch.allclose(windows.sum(dim=2), start.sum(dim=1).expand(4, -1))
    change = (windows[1] / windows[0]).log()
    assert 0.1 < float(change.std()) < 0.3
    assert torch.equal(windows, drift_sequence(start, Drift("lognormal", 0.2), 3, seed=2))


def test_heating_drift_raises_the_same_few_experts_every_window() -> None:
    start = torch.ones(3, 16, dtype=torch.float64)
    windows = drift_sequence(start, Drift("heating", 2.0, num_hot=2), 2, seed=5)
    grew = windows[1] > windows[0] * 1.5
    assert torch.equal(grew.sum(dim=1), torch.full((3,), 2))
    assert torch.equal(windows[2] > windows[1] * 1.5, grew)
    assert torch.allclose(windows.sum(dim=2), torch.full((3, 3), 16.0, dtype=torch.float64))


def test_bad_drift_arguments_are_rejected() -> None:
    with pytest.raises(WorkloadError, match="num_hot"):
        drift_sequence(torch.ones(1, 4), Drift("heating", 2.0, num_hot=5), 1, seed=0)
    with pytest.raises(WorkloadError, match="num_windows"):
        drift_sequence(torch.ones(1, 4), Drift("lognormal", 0.1), -1, seed=0)
    with pytest.raises(WorkloadError, match="spread"):
        Drift("lognormal", -0.1)
    with pytest.raises(WorkloadError):
        LoadDistribution("uniform", 1.0)  # type: ignore[arg-type]  # not a known kind on purpose


def test_step_samples_average_to_the_window_shares() -> None:
    load = LoadDistribution("zipf", 0.8).sample(2, 16, seed=9)
    steps = sample_step_loads(load, tokens_per_step=4096, top_k=8, num_steps=200, seed=1)
    assert steps.shape == (200, 2, 16)
    assert bool((steps == steps.round()).all())
    assert bool((steps >= 0).all())
    share = load / load.sum(dim=1, keepdim=True)
    assert torch.allclose(steps.mean(dim=0) / (4096 * 8), share, atol=2e-3)
    assert torch.equal(
        steps, sample_step_loads(load, tokens_per_step=4096, top_k=8, num_steps=200, seed=1)
    )
    with pytest.raises(WorkloadError, match="top_k"):
        sample_step_loads(load, tokens_per_step=1, top_k=0, num_steps=1, seed=1)
