"""The walk that finds the MoE model inside a served object, and the trace it builds.

Breadth-first over the objects that the steps reach, bounded in depth and in
objects checked. The walk knows steps only by their kind (``StepKind``), never
by ecosystem: an ``"adapt"`` step is not applied to an object that an
``"unwrap"`` step goes past towards something the same adapt step would also
adapt, so adapters are built on the innermost wrapped model, and the trace
shows where that model really is.
"""

from __future__ import annotations

import inspect
import itertools
from collections import deque
from typing import TYPE_CHECKING, Final, TypeGuard

import attrs

from moe_protocols.adapters._step import StepKind, UnwrapStep, step_kind
from moe_protocols.adapters._trace import ROOT_PATH, ResolutionTrace, TraceEntry, TraceOutcome
from moe_protocols.conformance import ConformanceReport, check_conformance
from moe_protocols.errors import ResolutionConfigError
from moe_protocols.protocols import COUNT_MEMBERS

if TYPE_CHECKING:
    from collections.abc import Sequence

    from moe_protocols.protocols import MixtureOfExperts

__all__ = ["walk"]


def _join(parent: str, step_name: str) -> str:
    if step_name.startswith((".", "[")):
        return parent + step_name
    if step_name.removesuffix("()").isidentifier():
        return f"{parent}.{step_name}"
    return f"{parent} -> {step_name}"


def _describe_exception(exc: BaseException) -> str:
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable message>"
    if len(message) > 200:
        message = message[:197] + "..."
    name = type(exc).__qualname__
    return f"{name}: {message}" if message else name


def _is_moe(candidate: object, report: ConformanceReport) -> TypeGuard[MixtureOfExperts]:
    """Narrow ``candidate`` by its own conformance report (checked just before)."""
    return report.is_moe


# Far above any real wrapper stack (a few levels): a larger value is a bug, and
# every candidate costs a conformance check, so it also bounds the walk's time.
_MAX_LIMIT: Final = 4096
_MAX_STEPS: Final = 1024


def _check_limit(name: str, value: object, *, minimum: int) -> None:
    if type(value) is bool or not isinstance(value, int):
        raise ResolutionConfigError(
            f"{name} must be an int, got {type(value).__qualname__} {_short_repr(value)}"
        )
    if value < minimum:
        raise ResolutionConfigError(f"{name} must be >= {minimum}, got {value}")
    if value > _MAX_LIMIT:
        raise ResolutionConfigError(f"{name} must be <= {_MAX_LIMIT}, got {value}")


def _short_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception:
        return "<unprintable>"
    return text if len(text) <= 80 else text[:77] + "..."


def _checked_steps(steps: Sequence[UnwrapStep]) -> tuple[UnwrapStep, ...]:
    """The steps as a tuple; a bad entry is reported before the walk starts, not midway."""
    try:
        checked = tuple(itertools.islice(steps, _MAX_STEPS + 1))
    except Exception as exc:
        raise ResolutionConfigError(
            f"steps must be a sequence of UnwrapStep, got {type(steps).__qualname__} "
            f"(iterating it raised {type(exc).__qualname__}: {exc})"
        ) from exc
    if len(checked) > _MAX_STEPS:
        raise ResolutionConfigError(f"steps holds more than {_MAX_STEPS} unwrapping steps")
    for index, step in enumerate(checked):
        try:
            name, probe = getattr(step, "name", None), getattr(step, "probe", None)
        except Exception:
            name = probe = None
        if not isinstance(name, str) or not callable(probe):
            raise ResolutionConfigError(
                f"steps[{index}] must be an UnwrapStep (a name and a probe), "
                f"got {type(step).__qualname__} {_short_repr(step)}"
            )
    return checked


def _forwards_counts(obj: object) -> bool:
    """Whether ``obj`` has none of the counts itself and reaches them through ``__getattr__``.

    Writing a count through a view of such a wrapper would land on the
    wrapper and shadow the model's own value, so the walk prefers the object
    the wrapper forwards to.
    """
    for name in COUNT_MEMBERS:
        try:
            inspect.getattr_static(obj, name)
        except AttributeError:
            continue
        except Exception:
            return False  # an object too odd to inspect statically is taken as it is
        return False
    return True


@attrs.frozen
class _Candidate:
    obj: object
    path: str
    depth: int
    step: str


@attrs.frozen
class _Probed:
    """What one step's probe gave for one object: the inner object, or the exception it raised."""

    inner: object | None
    error: Exception | None = None


class _Walk:
    """The state of one walk: the queue, what was seen, the trace so far."""

    def __init__(
        self,
        steps: tuple[UnwrapStep, ...],
        kinds: tuple[StepKind, ...],
        max_depth: int,
        max_candidates: int,
    ) -> None:
        self.steps, self.kinds = steps, kinds
        self.max_depth, self.max_candidates = max_depth, max_candidates
        self.entries: list[TraceEntry] = []
        self.seen: dict[int, str] = {}
        # Holding every seen or probed object keeps its id from being reused by a new
        # temporary a later probe returns, which would fake an "already visited".
        self.alive: list[object] = []
        self.queue: deque[_Candidate] = deque()
        self.budget_spent = False
        # A forwarding wrapper that conforms: (its entry's index, itself), to come back to.
        self.forwarding: tuple[int, MixtureOfExperts] | None = None
        # (step index, id(obj)) -> the probe's result, so that a probe runs once per object.
        self.probed: dict[tuple[int, int], _Probed] = {}

    def record(self, depth: int, path: str, step: str, outcome: TraceOutcome, detail: str) -> None:
        self.entries.append(TraceEntry(depth, path, step, outcome, detail))

    def trace(self) -> ResolutionTrace:
        return ResolutionTrace(tuple(self.entries), tuple(step.name for step in self.steps))

    def run(self, root: object) -> MixtureOfExperts | None:
        """Check candidates in breadth-first order until one is a MoE model; expand the others."""
        self.seen[id(root)] = ROOT_PATH
        self.alive.append(root)
        self.queue.append(_Candidate(root, ROOT_PATH, 0, ""))
        while self.queue:
            candidate = self.queue.popleft()
            found = self.check(candidate)
            if found is not None:
                return found
            if self.budget_spent or issubclass(type(candidate.obj), type):
                continue  # a class is not a served model: its attributes are not unwrapped
            self.expand(candidate)
        if self.forwarding is None:
            return None
        index, wrapper = self.forwarding
        entry = self.entries[index]
        summary = entry.report.summary() if entry.report is not None else entry.detail
        self.entries[index] = attrs.evolve(entry, outcome=TraceOutcome.RESOLVED, detail=summary)
        return wrapper

    def check(self, candidate: _Candidate) -> MixtureOfExperts | None:
        """Record ``candidate``'s conformance; the model when the walk ends at it."""
        obj, depth, path, step = candidate.obj, candidate.depth, candidate.path, candidate.step
        report = check_conformance(obj, path=path)
        if not _is_moe(obj, report):
            self.entries.append(
                TraceEntry(
                    depth, path, step, TraceOutcome.CANDIDATE_REJECTED, report.summary(), report
                )
            )
            return None
        if self.forwarding is None and _forwards_counts(obj):
            detail = report.summary() + (
                "; only through __getattr__ forwarding: looking for the model behind it"
            )
            self.entries.append(
                TraceEntry(depth, path, step, TraceOutcome.FORWARDS, detail, report)
            )
            self.forwarding = (len(self.entries) - 1, obj)
            return None
        self.entries.append(
            TraceEntry(depth, path, step, TraceOutcome.RESOLVED, report.summary(), report)
        )
        for waiting in self.queue:
            self.record(
                waiting.depth,
                waiting.path,
                waiting.step,
                TraceOutcome.NOT_CHECKED,
                f"{waiting.path} ({type(waiting.obj).__qualname__})",
            )
        return obj

    def expand(self, candidate: _Candidate) -> None:
        """Try every step on ``candidate``, queueing the new objects they reach."""
        depth = candidate.depth + 1
        if depth > self.max_depth:
            self.record(
                depth,
                candidate.path,
                "",
                TraceOutcome.DEPTH_LIMIT,
                f"{candidate.path} not unwrapped further (max_depth={self.max_depth})",
            )
            return
        for index, step in enumerate(self.steps):
            path = _join(candidate.path, step.name)
            if self.kinds[index] == "adapt" and self.wrapper_passed(index, candidate.obj):
                # An unwrap step leads from here to an object this step also adapts:
                # the adapter belongs there, and the walk gets there on its own.
                self.record(depth, path, step.name, TraceOutcome.NOT_APPLICABLE, "")
                continue
            probed = self.probe(index, candidate.obj)
            if probed.error is not None:
                detail = _describe_exception(probed.error)
                self.record(depth, path, step.name, TraceOutcome.RAISED, detail)
            elif not self.reach(candidate, depth, path, step.name, probed.inner):
                break

    def reach(self, parent: _Candidate, depth: int, path: str, step: str, inner: object) -> bool:
        """Record where a step led from ``parent``; False when the candidate budget ran out."""
        if inner is None:
            self.record(depth, path, step, TraceOutcome.NOT_APPLICABLE, "")
        elif inner is parent.obj:
            self.record(depth, path, step, TraceOutcome.ALREADY_VISITED, "the object itself")
        elif id(inner) in self.seen:
            detail = f"same object as {self.seen[id(inner)]}"
            self.record(depth, path, step, TraceOutcome.ALREADY_VISITED, detail)
        elif len(self.seen) >= self.max_candidates:
            self.budget_spent = True
            detail = (
                f"{step} from {parent.path} and any later steps not probed: "
                f"max_candidates={self.max_candidates} objects already found"
            )
            self.record(depth, path, step, TraceOutcome.BUDGET_EXHAUSTED, detail)
            return False
        else:
            self.seen[id(inner)] = path
            self.alive.append(inner)
            self.queue.append(_Candidate(inner, path, depth, step))
        return True

    def probe(self, index: int, obj: object) -> _Probed:
        """Step ``index``'s probe on ``obj``, run at most once per walk."""
        key = (index, id(obj))
        probed = self.probed.get(key)
        if probed is None:
            try:
                probed = _Probed(self.steps[index].probe(obj))
            except Exception as exc:
                probed = _Probed(None, exc)
            self.alive.append(obj)  # the key holds its id: keep the object alive
            self.alive.append(probed.inner)
            self.probed[key] = probed
        return probed

    def wrapper_passed(self, adapt_index: int, obj: object) -> bool:
        """Whether an unwrap step leads from ``obj`` to an object that step ``adapt_index`` adapts.

        Only asked when the step adapts ``obj`` itself; the probes it runs are
        remembered, so expanding the inner objects later costs nothing more.
        """
        own = self.probe(adapt_index, obj)
        if own.error is not None or own.inner is None:
            return False
        for index, kind in enumerate(self.kinds):
            if kind != "unwrap":
                continue
            inner = self.probe(index, obj).inner
            if inner is None or inner is obj:
                continue
            if self.probe(adapt_index, inner).inner is not None:
                return True
        return False


def walk(
    root: object,
    steps: Sequence[UnwrapStep],
    *,
    max_depth: int,
    max_candidates: int,
) -> tuple[MixtureOfExperts | None, ResolutionTrace]:
    """Find the shallowest object reachable from ``root`` that is a MoE model.

    Breadth-first from ``root`` itself (depth 0): a wrapper that implements
    the protocol by forwarding resolves to itself, and otherwise the
    shallowest MoE model wins. That is what makes the result agree with
    vLLM's one-level rule (the object itself, then ``get_language_model()``)
    whenever that rule finds a model; among objects at the same depth, step
    order breaks the tie, so the result is deterministic. One exception: an
    object that satisfies the protocol only by forwarding attribute reads
    through ``__getattr__`` (PEFT's ``PeftModel``, torch.compile's
    ``OptimizedModule``) is unwrapped further, and the first MoE model found
    behind it is preferred, because writes through such a wrapper would land
    on the wrapper; when none is found the walk comes back to it.

    An ``"adapt"`` step is not applied to an object from which an ``"unwrap"``
    step leads to another object that the same adapt step adapts (it shows as
    not applicable there): the walk goes past the wrapper and adapts the
    model inside it.

    Bounded by ``max_depth`` (objects deeper than that are not reached) and
    ``max_candidates`` (objects checked, the root included): a mock answers
    every probe with a new object, so the tree can be infinite. Cycle-safe:
    an object already seen (by identity) is recorded, not revisited. Nothing
    is written to any object; probes only read attributes and call the
    unwrapping methods.
    """
    checked = _checked_steps(steps)
    _check_limit("max_depth", max_depth, minimum=0)
    _check_limit("max_candidates", max_candidates, minimum=1)
    state = _Walk(checked, tuple(step_kind(s) for s in checked), max_depth, max_candidates)
    found = state.run(root)
    return found, state.trace()
