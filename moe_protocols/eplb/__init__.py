"""Engine-agnostic expert-parallel load balancing (EPLB).

The consumer of the ``MixtureOfExperts`` contract: :class:`EplbState` records
expert load, plans placements with a pluggable :class:`RebalancePolicy`, moves
expert weights (:func:`plan_transfer` / :func:`apply_transfer` in one process,
:func:`exchange_expert_weights` between EP ranks over ``torch.distributed``,
committed only when every rank succeeded) and keeps the maps the MoE layers
route with up to date, in place. Placements persist as JSON or safetensors
(:func:`save_placement` / :func:`load_placement`). Semantics follow vLLM
0.33's EPLB. Sizes are bounded by the limits in :mod:`limits`
(``moe_protocols.eplb.limits.MAX_LOGICAL_EXPERTS`` and friends).
"""

from __future__ import annotations

from . import _limits as limits
from ._bounds import (
    MigrationStats,
    balancedness_bound,
    duplicate_replicas,
    max_rank_load_lower_bound,
    migration_stats,
    realised_balancedness,
    sampled_balancedness,
)
from ._config import EplbConfig
from ._deepseek import DeepSeekPolicy
from ._distributed import (
    FaultHook,
    TransferJob,
    TransferOptions,
    default_buffer_bytes,
    exchange_expert_weights,
)
from ._mapping_io import (
    PLACEMENT_FORMAT,
    PLACEMENT_VERSION,
    Placement,
    load_placement,
    save_placement,
)
from ._maps import (
    compute_logical_maps,
    initial_physical_to_logical_map,
    initial_placement,
    max_replicas,
    validate_placement,
)
from ._metrics import (
    balancedness,
    expected_rank_loads,
    overall_balancedness,
    rank_loads_from_physical,
    refetched_per_rank,
    slots_changed,
    slots_refetched,
    token_weighted_balancedness,
)
from ._migration import MigrationAwarePolicy, replica_counts
from ._policy import (
    DEFAULT_POLICIES,
    PolicyRegistry,
    RebalancePolicy,
    check_policy_inputs,
    check_policy_output,
)
from ._state import (
    BalancednessStats,
    EplbState,
    ModelEplbState,
    ModelRearrangement,
    RearrangementResult,
)
from ._transfer import (
    ExpertCopy,
    ExpertSend,
    ExpertTransfer,
    LayerTransferPlan,
    StagedTransfer,
    TransferPlan,
    TransferStats,
    apply_transfer,
    plan_transfer,
    remote_fetches_required,
    stage_transfer,
)
from .dispatch import (
    DEFAULT_DISPATCH_ROUNDS,
    balanced_dispatch,
    dispatch_to_replicas,
    rank_loads_from_shares,
    replica_shares,
)

__all__ = [
    "DEFAULT_DISPATCH_ROUNDS",
    "DEFAULT_POLICIES",
    "PLACEMENT_FORMAT",
    "PLACEMENT_VERSION",
    "BalancednessStats",
    "DeepSeekPolicy",
    "EplbConfig",
    "EplbState",
    "ExpertCopy",
    "ExpertSend",
    "ExpertTransfer",
    "FaultHook",
    "LayerTransferPlan",
    "MigrationAwarePolicy",
    "MigrationStats",
    "ModelEplbState",
    "ModelRearrangement",
    "Placement",
    "PolicyRegistry",
    "RearrangementResult",
    "RebalancePolicy",
    "StagedTransfer",
    "TransferJob",
    "TransferOptions",
    "TransferPlan",
    "TransferStats",
    "apply_transfer",
    "balanced_dispatch",
    "balancedness",
    "balancedness_bound",
    "check_policy_inputs",
    "check_policy_output",
    "compute_logical_maps",
    "default_buffer_bytes",
    "dispatch_to_replicas",
    "duplicate_replicas",
    "exchange_expert_weights",
    "expected_rank_loads",
    "initial_physical_to_logical_map",
    "initial_placement",
    "limits",
    "load_placement",
    "max_rank_load_lower_bound",
    "max_replicas",
    "migration_stats",
    "overall_balancedness",
    "plan_transfer",
    "rank_loads_from_physical",
    "rank_loads_from_shares",
    "refetched_per_rank",
    "realised_balancedness",
    "remote_fetches_required",
    "replica_counts",
    "replica_shares",
    "sampled_balancedness",
    "save_placement",
    "slots_changed",
    "slots_refetched",
    "stage_transfer",
    "token_weighted_balancedness",
    "validate_placement",
]
