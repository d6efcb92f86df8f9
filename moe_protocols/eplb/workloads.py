"""Seeded MoE shapes, load distributions and drifts: kept here for existing imports.

The generators live in :mod:`moe_protocols.eplb.analysis.workloads`, the
opt-in research tools; this module re-exports them unchanged.
"""

from __future__ import annotations

from moe_protocols.eplb.analysis.workloads import (
    DEEPSEEK_V3_288,
    DEEPSEEK_V3_320,
    DEFAULT_TOKENS_PER_LAYER,
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

__all__ = [
    "DEEPSEEK_V3_288",
    "DEEPSEEK_V3_320",
    "DEFAULT_TOKENS_PER_LAYER",
    "QWEN3_235B",
    "STANDARD_DISTRIBUTIONS",
    "STANDARD_SHAPES",
    "Drift",
    "LoadDistribution",
    "MoEShape",
    "WorkloadError",
    "drift_sequence",
    "sample_step_loads",
]
