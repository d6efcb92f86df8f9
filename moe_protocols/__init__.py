"""moe-protocols: expert-parallel load balancing for any MoE model, native or wrapped.

The contract (``MixtureOfExperts``, ``MoELayer``), the guards and conformance
reports that check it, ``MoEView`` (finds the MoE model behind any chain of
wrappers and implements the contract by delegation), and an engine-agnostic
EPLB (``EplbState``, rebalancing policies, expert-weight transfer) that
consumes it, and ``verify_eplb_integration``, the self-test of a model's EPLB
integration. Reference models live in ``moe_protocols.models``.

Importing the package is cheap: each public name is imported from its module
on first use (so that ``moe-protocols --help`` does not wait for torch); type
checkers see ordinary re-exports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
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

_EXPORTS: Final[dict[str, str]] = {
    "DEFAULT_UNWRAP_STEPS": "moe_protocols.adapters",
    "MoEView": "moe_protocols.adapters",
    "ResolutionTrace": "moe_protocols.adapters",
    "TraceEntry": "moe_protocols.adapters",
    "TraceOutcome": "moe_protocols.adapters",
    "UnwrapStep": "moe_protocols.adapters",
    "ConformanceReport": "moe_protocols.conformance",
    "Problem": "moe_protocols.conformance",
    "ProblemKind": "moe_protocols.conformance",
    "check_conformance": "moe_protocols.conformance",
    "check_layer_conformance": "moe_protocols.conformance",
    "DEFAULT_POLICIES": "moe_protocols.eplb",
    "BalancednessStats": "moe_protocols.eplb",
    "DeepSeekPolicy": "moe_protocols.eplb",
    "EplbConfig": "moe_protocols.eplb",
    "EplbState": "moe_protocols.eplb",
    "MigrationAwarePolicy": "moe_protocols.eplb",
    "Placement": "moe_protocols.eplb",
    "PolicyRegistry": "moe_protocols.eplb",
    "RearrangementResult": "moe_protocols.eplb",
    "RebalancePolicy": "moe_protocols.eplb",
    "load_placement": "moe_protocols.eplb",
    "save_placement": "moe_protocols.eplb",
    "CheckpointError": "moe_protocols.errors",
    "CollectiveTimeoutError": "moe_protocols.errors",
    "EplbConfigError": "moe_protocols.errors",
    "EplbOwnershipError": "moe_protocols.errors",
    "EplbStateError": "moe_protocols.errors",
    "ExpertLoadError": "moe_protocols.errors",
    "MappingError": "moe_protocols.errors",
    "ModelConfigError": "moe_protocols.errors",
    "ModelInputError": "moe_protocols.errors",
    "MoEProtocolsError": "moe_protocols.errors",
    "NotMixtureOfExpertsError": "moe_protocols.errors",
    "PolicyError": "moe_protocols.errors",
    "TransferError": "moe_protocols.errors",
    "TransferTimeoutError": "moe_protocols.errors",
    "VerificationInputError": "moe_protocols.errors",
    "WorkloadError": "moe_protocols.errors",
    "is_mixture_of_experts": "moe_protocols.guards",
    "is_moe_layer": "moe_protocols.guards",
    "supports_language_model": "moe_protocols.guards",
    "LayerEplbRows": "moe_protocols.layer_views",
    "layer_eplb_rows": "moe_protocols.layer_views",
    "ExpertParallelContext": "moe_protocols.parallel",
    "MixtureOfExperts": "moe_protocols.protocols",
    "MoELayer": "moe_protocols.protocols",
    "SupportsLanguageModel": "moe_protocols.protocols",
    "ReferenceRunner": "moe_protocols.runner",
    "RunnerConfig": "moe_protocols.runner",
    "CheckStatus": "moe_protocols.verification",
    "VerificationCheck": "moe_protocols.verification",
    "VerificationReport": "moe_protocols.verification",
    "outputs_difference": "moe_protocols.verification",
    "verify_eplb_integration": "moe_protocols.verification",
}
"""Each public name and the module it is imported from on first use."""

if not TYPE_CHECKING:  # hidden from checkers: a module __getattr__ would accept any name

    def __getattr__(name: str) -> object:
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module 'moe_protocols' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})


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
