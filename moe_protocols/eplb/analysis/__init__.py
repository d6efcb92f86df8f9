"""Research tools for placements, opt in: bounds, migration statistics and synthetic workloads.

Nothing in the engine imports this package; benchmarks, studies and tests
do. :mod:`.bounds` holds the lower bound on the max rank load, the best
reachable balancedness, migration statistics and realised balance;
:mod:`.workloads` the seeded MoE shapes, load distributions and drifts.
"""

from __future__ import annotations

from .bounds import (
    MigrationStats,
    balancedness_bound,
    duplicate_replicas,
    max_rank_load_lower_bound,
    migration_stats,
    realised_balancedness,
    sampled_balancedness,
)
from .workloads import (
    DEEPSEEK_V3_288,
    DEEPSEEK_V3_320,
    QWEN3_235B,
    STANDARD_DISTRIBUTIONS,
    STANDARD_SHAPES,
    Drift,
    LoadDistribution,
    MoEShape,
    drift_sequence,
    sample_step_loads,
)

__all__ = [
    "DEEPSEEK_V3_288",
    "DEEPSEEK_V3_320",
    "QWEN3_235B",
    "STANDARD_DISTRIBUTIONS",
    "STANDARD_SHAPES",
    "Drift",
    "LoadDistribution",
    "MigrationStats",
    "MoEShape",
    "balancedness_bound",
    "drift_sequence",
    "duplicate_replicas",
    "max_rank_load_lower_bound",
    "migration_stats",
    "realised_balancedness",
    "sampled_balancedness",
    "sample_step_loads",
]
