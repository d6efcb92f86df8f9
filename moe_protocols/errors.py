"""Typed errors raised by moe-protocols.

Every rejection in the library is one of these. Messages name the object, the
path to it, and what is missing or wrong, so the error alone tells the story.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NotRequired, TypedDict, Unpack

if TYPE_CHECKING:
    from moe_protocols.adapters._trace import ResolutionTrace
    from moe_protocols.conformance import ConformanceReport

__all__ = [
    "CheckpointError",
    "CollectiveTimeoutError",
    "EplbConfigError",
    "EplbOwnershipError",
    "EplbStateError",
    "ExpertLoadError",
    "MappingError",
    "ModelConfigError",
    "ModelInputError",
    "MoEProtocolsError",
    "NotMixtureOfExpertsError",
    "PlacementFileError",
    "PolicyError",
    "ResolutionConfigError",
    "TransferError",
    "TransferTimeoutError",
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


class PlacementFileError(MappingError):
    """A placement file cannot be read or written, is not a placement, or holds an invalid one.

    Raised by ``load_placement``/``save_placement`` for every failure: a path
    that is not a ``str``/``PathLike``, a file that is not a regular file (a
    FIFO, a device, a directory), larger than the size limit, nested deeper
    than ``MAX_JSON_DEPTH``, malformed, or whose placement is invalid.
    ``path`` is the file as given, or ``None`` when the argument was no path.
    """

    def __init__(self, message: str, *, path: str | None) -> None:
        super().__init__(message)
        self.path = path


class ResolutionConfigError(MoEProtocolsError, ValueError, TypeError):
    """``MoEView.resolve``/``require`` were given arguments they cannot use.

    A ``max_depth`` or ``max_candidates`` that is not an int in range, or
    unwrapping steps that are not ``UnwrapStep``s. Also a ``ValueError`` and a
    ``TypeError``, the errors these arguments raised before.
    """


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
        self.rank: int | None = rank
        self.layer: int | None = layer


class _TimeoutDetails(TypedDict):
    phase: str
    missing_ranks: Sequence[int]
    deadline_s: float
    layer: NotRequired[int | None]


class CollectiveTimeoutError(EplbStateError):
    """An EP rank did not arrive at a collective of an EPLB operation before its deadline.

    Raised on every rank that did arrive, with nothing changed there.
    ``phase`` is the phase the group broke in (the earliest any surviving rank
    reported: ``"lockstep check"``, ``"load reduce"``, ``"plan agreement"``,
    ``"placement agreement"``, ``"exchange"`` or ``"commit vote"``);
    ``missing_ranks`` the EP ranks that did not report within the deadline
    (empty when every other rank did, so this rank was the late one, or when
    the process group's store could not be reached); ``deadline_s`` the
    deadline in seconds; ``layer`` the first MoE layer of the batch this rank
    stopped at in the exchange, else ``None``. The process group is unusable
    afterwards.
    """

    def __init__(self, message: str, **details: Unpack[_TimeoutDetails]) -> None:
        super().__init__(message)
        self.phase: str = details["phase"]
        self.missing_ranks: tuple[int, ...] = tuple(details["missing_ranks"])
        self.deadline_s: float = details["deadline_s"]
        self.layer: int | None = details.get("layer")


class TransferTimeoutError(CollectiveTimeoutError, TransferError):
    """A :class:`CollectiveTimeoutError` in the weight exchange or the commit vote.

    Also a :class:`TransferError`: ``rank`` is the lowest missing rank (``None``
    when ``missing_ranks`` is empty), ``layer`` as in :class:`CollectiveTimeoutError`.
    """

    def __init__(self, message: str, **details: Unpack[_TimeoutDetails]) -> None:
        super().__init__(message, **details)
        self.rank: int | None = min(self.missing_ranks, default=None)


class ModelConfigError(MoEProtocolsError, ValueError):
    """A reference-model configuration value is out of range or inconsistent with another."""


class ModelInputError(MoEProtocolsError, ValueError):
    """A reference model's forward was given inputs of the wrong kind or shape."""


class CheckpointError(MoEProtocolsError, ValueError):
    """A checkpoint's expert tensors do not fit an experts container (absent experts, shapes)."""


class VerificationInputError(MoEProtocolsError, ValueError):
    """``verify_eplb_integration`` cannot run with what it was given.

    No sample inputs were passed and none can be synthesised (the model shows
    no vocabulary size), the inputs are of a kind it cannot feed, or an option
    (a tolerance) is out of range. A failing *model* is a report, not this.
    """


class WorkloadError(MoEProtocolsError, ValueError):
    """A workload generator was given parameters it cannot honour."""
