"""``MoEView``: the one object a runner needs to treat any served model as ``MixtureOfExperts``.

The runner resolves once, at load time (``MoEView.resolve(model)``), and from
then on talks to the view: registration with EPLB, the per-step guard,
restoring a saved placement and elastic-EP updates all reach the MoE model,
wherever it is wrapped. The view delegates explicitly, one declared member
per protocol member, so there is no ``__getattr__`` to hide a typo. The data
members are declared as attributes (``num_moe_layers: int``), which is what
both mypy and pyright require of an implementation of vLLM's protocol; a
descriptor behind each declaration forwards reads and writes to the model
(see ``_forward.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Generic, cast, final, overload

from typing_extensions import TypeVar

from moe_protocols.adapters._defaults import DEFAULT_UNWRAP_STEPS
from moe_protocols.adapters._forward import forwarded
from moe_protocols.adapters._step import UnwrapStep
from moe_protocols.adapters._trace import ROOT_PATH, ResolutionTrace, TraceOutcome
from moe_protocols.adapters._walk import walk
from moe_protocols.conformance import MIXTURE_OF_EXPERTS, ProblemKind
from moe_protocols.errors import NotMixtureOfExpertsError, ResolutionConfigError
from moe_protocols.protocols import MODEL_MEMBERS, MixtureOfExperts, MoELayer

if TYPE_CHECKING:
    from collections.abc import Iterable, MutableSequence, Sequence

    from torch import Tensor

    from moe_protocols.conformance import ConformanceReport

__all__ = ["MoEView"]

DEFAULT_MAX_DEPTH: Final = 6
DEFAULT_MAX_CANDIDATES: Final = 256
_MAX_REPORTS_IN_MESSAGE: Final = 10
_MAX_MODULES_SCANNED: Final = 100_000
_EXPERT_NAMES: Final = frozenset({"experts", "expert", "routed_experts", "moe_experts"})
_FIXED: Final = frozenset({"_root", "_model", "_trace"})

LayerT = TypeVar("LayerT", bound=MoELayer, default=MoELayer)
"""The layer type of a ``MoEView`` (invariant: the view's ``moe_layers`` is settable)."""
_L = TypeVar("_L", bound=MoELayer)


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line if line else line for line in text.splitlines())


@final
class MoEView(Generic[LayerT]):
    """The MoE model found inside a served object, presented as a ``MixtureOfExperts``.

    Every protocol member reads from and writes to the resolved model
    (``view.model``): ``view.expert_weights`` is the model's own list,
    ``view.num_physical_experts = 16`` sets the model's count, and
    ``set_eplb_state`` / ``update_physical_experts_metadata`` are forwarded
    with the same keyword arguments. ``root``, ``model`` and ``trace`` are
    read-only. Build one with ``resolve`` or ``require``.

    Generic in the layer type: ``MoEView`` alone is ``MoEView[MoELayer]``;
    ``MoEView.require(model, layer_type=MoERunner)`` checks that every layer
    is a ``MoERunner`` and gives a ``MoEView[MoERunner]``, which type checkers
    accept as vLLM's ``MixtureOfExperts`` (its ``moe_layers`` is
    ``Sequence[MoERunner]``, invariant).
    """

    if TYPE_CHECKING:
        _root: object
        _model: MixtureOfExperts[LayerT]
        _trace: ResolutionTrace
    else:
        # No instance dict, so a misspelt member cannot be set by accident. Hidden
        # from type checkers, which would take the forwarded members (declared
        # as class attributes, not slots) for unsettable names.
        __slots__ = ("_model", "_root", "_trace")

    # ------------------------------------------------ MixtureOfExperts: data members

    expert_weights: MutableSequence[Sequence[Tensor]] = forwarded(
        "_model",
        "The model's ``expert_weights`` (the same list), ``[local_physical, ...]`` tensors.",
    )
    num_moe_layers: int = forwarded("_model", "The model's ``num_moe_layers``.")
    num_expert_groups: int = forwarded("_model", "The model's ``num_expert_groups``.")
    num_logical_experts: int = forwarded("_model", "The model's ``num_logical_experts``.")
    num_physical_experts: int = forwarded("_model", "The model's ``num_physical_experts``.")
    num_local_physical_experts: int = forwarded(
        "_model", "The model's ``num_local_physical_experts``."
    )
    num_routed_experts: int = forwarded("_model", "The model's ``num_routed_experts``.")
    num_shared_experts: int = forwarded("_model", "The model's ``num_shared_experts``.")
    num_redundant_experts: int = forwarded("_model", "The model's ``num_redundant_experts``.")
    moe_layers: Sequence[LayerT] = forwarded(
        "_model", "The model's ``moe_layers`` (the same sequence object)."
    )

    def __init__(
        self, root: object, model: MixtureOfExperts[LayerT], trace: ResolutionTrace
    ) -> None:
        """Wrap ``model``, found in ``root`` as ``trace`` says; use ``resolve``/``require``.

        Raises:
            NotMixtureOfExpertsError: ``trace`` is not a successful resolution.
        """
        if trace.resolved_path is None:
            raise NotMixtureOfExpertsError(
                f"MoEView({type(root).__qualname__}, {type(model).__qualname__}, trace) needs "
                "the trace of a successful resolution; use MoEView.resolve() or "
                "MoEView.require() to build one",
                trace=trace,
                reports=trace.reports,
            )
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_trace", trace)

    if not TYPE_CHECKING:
        # Hidden from type checkers on purpose: a class with __setattr__ lets
        # them accept any attribute name, and a typo must stay an error.
        def __setattr__(self, name: str, value: object) -> None:
            if name in _FIXED:
                raise AttributeError(
                    f"MoEView.{name} is fixed when the view is built; resolve a new view"
                )
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------ construction

    @overload
    @classmethod
    def resolve(
        cls,
        model: object,
        *,
        layer_type: None = None,
        steps: Sequence[UnwrapStep] = ...,
        max_depth: int = ...,
        max_candidates: int = ...,
    ) -> MoEView[MoELayer] | None: ...

    @overload
    @classmethod
    def resolve(
        cls,
        model: object,
        *,
        layer_type: type[_L],
        steps: Sequence[UnwrapStep] = ...,
        max_depth: int = ...,
        max_candidates: int = ...,
    ) -> MoEView[_L] | None: ...

    @classmethod
    def resolve(
        cls,
        model: object,
        *,
        layer_type: type[MoELayer] | None = None,
        steps: Sequence[UnwrapStep] = DEFAULT_UNWRAP_STEPS,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
    ) -> MoEView[Any] | None:
        """Find the MoE model in ``model`` (itself or behind wrappers); None when there is none.

        Walks breadth-first from ``model`` through ``steps`` (see
        ``DEFAULT_UNWRAP_STEPS``), at most ``max_depth`` levels and
        ``max_candidates`` objects, and returns a view of the shallowest object
        that conforms to ``MixtureOfExperts`` with at least one MoE layer. A
        failing step is recorded in the trace, never raised. Nothing in the
        model is modified. With ``layer_type``, the found model's layers must
        all be instances of it (else None) and the view is typed
        ``MoEView[layer_type]``.

        Raises:
            ResolutionConfigError: ``max_depth`` (>= 0) or ``max_candidates``
                (>= 1) is not an int up to 4096, ``steps`` is not a sequence
                of at most 1024 ``UnwrapStep``, or ``layer_type`` is not a class.
        """
        _check_layer_type(layer_type)
        found, trace = walk(model, steps, max_depth=max_depth, max_candidates=max_candidates)
        if found is None or _wrong_layer(found, layer_type) is not None:
            return None
        return MoEView(model, found, trace)

    @overload
    @classmethod
    def require(
        cls,
        model: object,
        *,
        layer_type: None = None,
        steps: Sequence[UnwrapStep] = ...,
        max_depth: int = ...,
        max_candidates: int = ...,
    ) -> MoEView[MoELayer]: ...

    @overload
    @classmethod
    def require(
        cls,
        model: object,
        *,
        layer_type: type[_L],
        steps: Sequence[UnwrapStep] = ...,
        max_depth: int = ...,
        max_candidates: int = ...,
    ) -> MoEView[_L]: ...

    @classmethod
    def require(
        cls,
        model: object,
        *,
        layer_type: type[MoELayer] | None = None,
        steps: Sequence[UnwrapStep] = DEFAULT_UNWRAP_STEPS,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
    ) -> MoEView[Any]:
        """Like ``resolve``, but raise when no MoE model is found.

        Raises:
            NotMixtureOfExpertsError: nothing reachable from ``model`` is a MoE
                model; the message names the served class, prints the trace
                (every step tried at every level) and every candidate's
                conformance report, and the exception carries both. Also
                when a ``layer_type`` is given and a layer of the model found
                is not one (the message names the layer and its class).
            ResolutionConfigError: the arguments are invalid (see ``resolve``).
        """
        _check_layer_type(layer_type)
        found, trace = walk(model, steps, max_depth=max_depth, max_candidates=max_candidates)
        if found is None:
            raise NotMixtureOfExpertsError(
                _not_found_message(model, trace, max_depth=max_depth),
                trace=trace,
                reports=trace.reports,
            )
        wrong = _wrong_layer(found, layer_type)
        if wrong is not None:
            raise NotMixtureOfExpertsError(
                f"{type(model).__qualname__} (the served model) holds a MixtureOfExperts at "
                f"{trace.resolved_path} ({type(found).__qualname__}), but {wrong}",
                trace=trace,
                reports=trace.reports,
            )
        return MoEView(model, found, trace)

    # ----------------------------------------------------------- the view itself

    @property
    def root(self) -> object:
        """The served object the view was resolved from."""
        return self._root

    @property
    def model(self) -> MixtureOfExperts[LayerT]:
        """The resolved MoE model (the object every member is delegated to)."""
        return self._model

    @property
    def trace(self) -> ResolutionTrace:
        """How the model was found: every candidate checked and step tried."""
        return self._trace

    def __repr__(self) -> str:
        path = self._trace.resolved_path or ROOT_PATH
        where = "root" + path.removeprefix(ROOT_PATH)
        if path != ROOT_PATH:
            where += f" -> {type(self._model).__qualname__}"
        try:
            model = self._model
            counts = (
                f"{model.num_moe_layers} MoE layers, {model.num_logical_experts} logical / "
                f"{model.num_physical_experts} physical experts"
            )
        except Exception as exc:  # a repr must not fail because the model broke later
            counts = f"counts unreadable: {type(exc).__qualname__}"
        return f"MoEView(root={type(self._root).__qualname__}, model={where}, {counts})"

    # ------------------------------------------------------ MixtureOfExperts: methods

    def set_eplb_state(
        self,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        """Forward to the model's ``set_eplb_state`` (by keyword, the same tensors)."""
        self._model.set_eplb_state(
            expert_load_view=expert_load_view,
            logical_to_physical_map=logical_to_physical_map,
            logical_replica_count=logical_replica_count,
        )

    def update_physical_experts_metadata(
        self,
        num_physical_experts: int,
        num_local_physical_experts: int,
    ) -> None:
        """Forward to the model's ``update_physical_experts_metadata`` (by keyword)."""
        self._model.update_physical_experts_metadata(
            num_physical_experts=num_physical_experts,
            num_local_physical_experts=num_local_physical_experts,
        )


def _check_layer_type(layer_type: object) -> None:
    if layer_type is not None and not isinstance(layer_type, type):
        raise ResolutionConfigError(
            f"layer_type must be a class (the type of every MoE layer), got "
            f"{type(layer_type).__qualname__} {layer_type!r}"
        )


def _wrong_layer(model: MixtureOfExperts, layer_type: type[MoELayer] | None) -> str | None:
    """Why ``model``'s layers are not all ``layer_type`` instances; None when they are."""
    if layer_type is None:
        return None
    for index, layer in enumerate(model.moe_layers):
        # layer_type is the caller's class, not one this library names.
        if not isinstance(layer, layer_type):
            return (
                f"moe_layers[{index}] is a {type(layer).__qualname__} instance, not a "
                f"{layer_type.__qualname__} (the layer_type asked for)"
            )
    return None


def _near_miss(reports: Sequence[ConformanceReport]) -> ConformanceReport | None:
    """The candidate closest to a MixtureOfExperts: most members present, fewest problems.

    None when every candidate is a plain wrapper (none of the members) or when
    the closest one has more missing members than present ones.
    """
    closest: ConformanceReport | None = None
    for report in reports:
        if report.lacks_every_member or report.protocol != MIXTURE_OF_EXPERTS:
            continue
        missing = sum(p.kind is ProblemKind.MISSING for p in report.problems)
        if 2 * missing > len(MODEL_MEMBERS):
            continue
        if closest is None or len(report.problems) < len(closest.problems):
            closest = report
    return closest


def _not_found_message(model: object, trace: ResolutionTrace, *, max_depth: int) -> str:
    served = type(model).__qualname__
    reports = trace.reports
    near = _near_miss(reports)
    if near is not None and near.num_moe_layers == 0 and near.ok:
        headline = (
            f"{served} (the served model) is not a MixtureOfExperts with MoE layers: it "
            f"leads to {near.path} ({near.subject}), a MixtureOfExperts with num_moe_layers "
            "== 0 (a dense model, or a pipeline stage without MoE layers): nothing to balance."
        )
    elif near is not None:
        problems = "; ".join(p.brief for p in near.problems[:3])
        more = len(near.problems) - 3
        headline = (
            f"{served} (the served model) is not a MixtureOfExperts with MoE layers. The "
            f"closest object inside it, {near.path} ({near.subject}), almost is: "
            f"{problems}" + (f" (+{more} more)" if more > 0 else "") + "."
        )
    else:
        headline = (
            f"{served} (the served model) is not a MixtureOfExperts with MoE layers, and none "
            f"was found inside it after checking {len(reports)} object(s) up to depth "
            f"{max_depth}."
        )
    lines = [
        headline,
        f"Unwrapping steps tried at each level: {', '.join(trace.steps) or '(none)'}.",
        "Resolution trace:",
        _indent(str(trace)),
        "Why each candidate was rejected:",
    ]
    for report in reports[:_MAX_REPORTS_IN_MESSAGE]:
        if report.lacks_every_member:
            # A plain wrapper: twelve "missing" lines would bury the candidates that matter.
            lines.append(
                f"  {report.path} ({report.subject}) has none of the {report.protocol} members"
            )
        else:
            lines.append(_indent(str(report)))
    hidden = len(reports) - _MAX_REPORTS_IN_MESSAGE
    if hidden > 0:
        lines.append(f"  ... and {hidden} more candidates (see the error's .reports)")
    experts = moe_looking_module(model)
    if experts is not None:
        lines.insert(
            1,
            f"It holds MoE-looking modules ({experts}) but no MixtureOfExperts: make its MoE "
            "model EPLB-ready with moe_protocols.building (SwiGLUExperts.from_module_list for "
            'the experts, MoEModelMixin for the model); see docs/authoring.md, "Making a model '
            'EPLB-ready".',
        )
    stopped = [e.path for e in trace.entries if e.outcome is TraceOutcome.DEPTH_LIMIT]
    if stopped:
        lines.append(
            f"The walk stopped at depth {max_depth} before unwrapping {', '.join(stopped[:3])}"
            + (f" (+{len(stopped) - 3} more)" if len(stopped) > 3 else "")
            + f": raise the limit (--max-depth N on the command line, max_depth=N in Python; "
            f"now {max_depth})."
        )
    elif near is None:
        lines.append(
            "A wrapper that hides the model some other way can be taught with "
            "steps=(*DEFAULT_UNWRAP_STEPS, UnwrapStep(...))."
        )
    return "\n".join(lines)


def moe_looking_module(model: object) -> str | None:
    """Path of the first submodule named like routed experts (``...experts``), if any.

    A plain MoE model holds its experts as ``experts``/``expert`` modules; a model
    with them but without the protocol needs the building blocks, not an unwrapping step.
    Never raises; looks at no more than ``_MAX_MODULES_SCANNED`` modules.
    """
    named_modules = getattr(model, "named_modules", None)
    if not callable(named_modules):
        return None
    try:
        for count, item in enumerate(cast("Iterable[object]", named_modules())):
            if count >= _MAX_MODULES_SCANNED:
                return None
            name = cast("tuple[object, ...]", item)[0] if isinstance(item, tuple) and item else None
            if isinstance(name, str) and name.rsplit(".", 1)[-1].lower() in _EXPERT_NAMES:
                return name
    except Exception:
        return None
    return None
