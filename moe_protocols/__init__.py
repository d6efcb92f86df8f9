"""moe-protocols: expert-parallel load balancing for any MoE model, native or wrapped.

The contract (``MixtureOfExperts``, ``MoELayer``), the guards and conformance
reports that check it, ``MoEView`` (finds the MoE model behind any chain of
wrappers and implements the contract by delegation), and an engine-agnostic
EPLB (``EplbState``, rebalancing policies, expert-weight transfer) that
consumes it, and ``verify_eplb_integration``, the self-test of a model's EPLB
integration. Reference models live in ``moe_protocols.models``.
"""

from __future__ import annotations

from moe_protocols.adapters import (
    DEFAULT_UNWRAP_STEPS,
    MoEView,
    ResolutionTrace,
    TraceEntry,
    TraceOutcome,
    UnwrapStep,
)
from moe_protocols.conformance import (
    ConformanceReport,
    Problem,
    ProblemKind,
    check_conformance,
    check_layer_conformance,
)
from moe_protocols.eplb import (
    DEFAULT_POLICIES,
    BalancednessStats,
    DeepSeekPolicy,
    EplbConfig,
    EplbState,
    MigrationAwarePolicy,
    Placement,
    PolicyRegistry,
    RearrangementResult,
    RebalancePolicy,
    load_placement,
    save_placement,
)
from moe_protocols.errors import (
    CheckpointError,
    CollectiveTimeoutError,
    EplbConfigError,
    EplbOwnershipError,
    EplbStateError,
    ExpertLoadError,
    MappingError,
    ModelConfigError,
    ModelInputError,
    MoEProtocolsError,
    NotMixtureOfExpertsError,
    PolicyError,
    TransferError,
    TransferTimeoutError,
    VerificationInputError,
    WorkloadError,
)
from moe_protocols.guards import is_mixture_of_experts, is_moe_layer, supports_language_model
from moe_protocols.layer_views import LayerEplbRows, layer_eplb_rows
from moe_protocols.parallel import ExpertParallelContext
from moe_protocols.protocols import MixtureOfExperts, MoELayer, SupportsLanguageModel
from moe_protocols.runner import ReferenceRunner, RunnerConfig
from moe_protocols.verification import (
    CheckStatus,
    VerificationCheck,
    VerificationReport,
    outputs_difference,
    verify_eplb_integration,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "DEFAULT_POLICIES",
    "DEFAULT_UNWRAP_STEPS",
    "BalancednessStats",
    "CheckStatus",
    "CheckpointError",
    "ConformanceReport",
    "DeepSeekPolicy",
    "EplbConfig",
    "CollectiveTimeoutError",
    "EplbConfigError",
    "EplbState",
    "EplbOwnershipError",
    "EplbStateError",
    "ExpertLoadError",
    "ExpertParallelContext",
    "LayerEplbRows",
    "MappingError",
    "MigrationAwarePolicy",
    "MixtureOfExperts",
    "MoELayer",
    "MoEProtocolsError",
    "MoEView",
    "ModelConfigError",
    "ModelInputError",
    "NotMixtureOfExpertsError",
    "Placement",
    "PolicyError",
    "PolicyRegistry",
    "Problem",
    "ProblemKind",
    "RearrangementResult",
    "RebalancePolicy",
    "ReferenceRunner",
    "ResolutionTrace",
    "RunnerConfig",
    "SupportsLanguageModel",
    "TraceEntry",
    "TraceOutcome",
    "TransferError",
    "TransferTimeoutError",
    "UnwrapStep",
    "VerificationCheck",
    "VerificationInputError",
    "VerificationReport",
    "WorkloadError",
    "__version__",
    "check_conformance",
    "check_layer_conformance",
    "is_mixture_of_experts",
    "is_moe_layer",
    "layer_eplb_rows",
    "load_placement",
    "outputs_difference",
    "save_placement",
    "supports_language_model",
    "verify_eplb_integration",
]
