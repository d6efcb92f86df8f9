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

Policies live in :mod:`moe_protocols.eplb.policies` (the contract, the
registry, the built-in policies and their shared primitives); per-step
replica dispatch in :mod:`moe_protocols.eplb.dispatch`; the research tools
(bounds, migration statistics, synthetic workloads) in the opt-in
:mod:`moe_protocols.eplb.analysis`, which nothing in the engine imports.
"""

from __future__ import annotations

from . import _limits as limits
from ._config import EplbConfig
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
from ._ownership import Claim, find_owner
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
from .policies import (
    DEFAULT_POLICIES,
    CheckedPolicy,
    DeepSeekPolicy,
    MigrationAwarePolicy,
    PolicyRegistry,
    RebalancePolicy,
    checked_rebalance,
)

__all__ = [
    "DEFAULT_DISPATCH_ROUNDS",
    "DEFAULT_POLICIES",
    "PLACEMENT_FORMAT",
    "PLACEMENT_VERSION",
    "BalancednessStats",
    "CheckedPolicy",
    "Claim",
    "DeepSeekPolicy",
    "EplbConfig",
    "EplbState",
    "ExpertCopy",
    "ExpertSend",
    "ExpertTransfer",
    "FaultHook",
    "LayerTransferPlan",
    "MigrationAwarePolicy",
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
    "checked_rebalance",
    "compute_logical_maps",
    "default_buffer_bytes",
    "dispatch_to_replicas",
    "exchange_expert_weights",
    "find_owner",
    "expected_rank_loads",
    "initial_physical_to_logical_map",
    "initial_placement",
    "limits",
    "load_placement",
    "max_replicas",
    "overall_balancedness",
    "plan_transfer",
    "rank_loads_from_physical",
    "rank_loads_from_shares",
    "refetched_per_rank",
    "remote_fetches_required",
    "replica_shares",
    "save_placement",
    "slots_changed",
    "slots_refetched",
    "stage_transfer",
    "token_weighted_balancedness",
    "validate_placement",
]
