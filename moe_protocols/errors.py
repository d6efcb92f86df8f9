"""Typed errors raised by moe-protocols.

Every rejection in the library is one of these. Messages name the object, the
path to it, and what is missing or wrong, so the error alone tells the story.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moe_protocols.adapters._trace import ResolutionTrace
    from moe_protocols.conformance import ConformanceReport

__all__ = [
    "EplbConfigError",
    "EplbOwnershipError",
    "EplbStateError",
    "ExpertLoadError",
    "MappingError",
    "ModelConfigError",
    "ModelInputError",
    "MoEProtocolsError",
    "NotMixtureOfExpertsError",
    "PolicyError",
    "TransferError",
    "VerificationInputError",
    "WorkloadError",
]


class MoEProtocolsError(Exception):
    """Base class of every error this library raises on purpose."""


class NotMixtureOfExpertsError(MoEProtocolsError, TypeError):
    """No object reachable from the served model satisfies ``MixtureOfExperts``.

    Carries the resolution trace (every unwrapping step tried) and the
    conformance report of every candidate seen, so the caller can see why
    each was rejected.
    """

    def __init__(
        self,
        message: str,
        *,
        trace: ResolutionTrace | None = None,
        reports: Sequence[ConformanceReport] = (),
    ) -> None:
        super().__init__(message)
        self.trace = trace
        self.reports: tuple[ConformanceReport, ...] = tuple(reports)


class EplbConfigError(MoEProtocolsError, ValueError):
    """An EPLB configuration value is out of range or inconsistent."""


class MappingError(MoEProtocolsError, ValueError):
    """An expert placement (physical-to-logical map) is malformed or does not fit the model."""


class PolicyError(MoEProtocolsError, ValueError):
    """A rebalancing policy was given arguments it cannot honour, or returned a bad placement."""


class EplbStateError(MoEProtocolsError, RuntimeError):
    """An EPLB state operation was called in a state that does not allow it."""


class EplbOwnershipError(EplbStateError):
    """A model's MoE layers are already registered with another live EPLB state.

    Registering them again would hand the layers other tensors and silently
    detach the first state. ``owner_model_name`` is the name they are
    registered under there; ``layers`` the indices of the shared MoE layers.
    """

    def __init__(self, message: str, *, owner_model_name: str, layers: Sequence[int]) -> None:
        super().__init__(message)
        self.owner_model_name = owner_model_name
        self.layers: tuple[int, ...] = tuple(layers)


class ExpertLoadError(EplbStateError):
    """A MoE layer wrote a load row that cannot be real (negative counts); nothing was moved.

    ``layers`` are the indices of the MoE layers whose rows are wrong.
    """

    def __init__(self, message: str, *, layers: Sequence[int]) -> None:
        super().__init__(message)
        self.layers: tuple[int, ...] = tuple(layers)


class TransferError(MoEProtocolsError, RuntimeError):
    """Moving expert weights failed; nothing was committed.

    ``rank`` and ``layer`` say where the failure happened when that is known.
    """

    def __init__(self, message: str, *, rank: int | None = None, layer: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.layer = layer


class ModelConfigError(MoEProtocolsError, ValueError):
    """A reference-model configuration value is out of range or inconsistent with another."""


class ModelInputError(MoEProtocolsError, ValueError):
    """A reference model's forward was given inputs of the wrong kind or shape."""


class VerificationInputError(MoEProtocolsError, ValueError):
    """``verify_eplb_integration`` cannot run with what it was given.

    No sample inputs were passed and none can be synthesised (the model shows
    no vocabulary size), the inputs are of a kind it cannot feed, or an option
    (a tolerance) is out of range. A failing *model* is a report, not this.
    """


class WorkloadError(MoEProtocolsError, ValueError):
    """A workload generator was given parameters it cannot honour."""
