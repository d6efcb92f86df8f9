"""Unwrapping steps and the walk that finds the MoE model inside a served object.

A step is a small named probe: given an object, it returns the object one
wrapper level down, or None when it does not apply. Probes are structural
(an attribute or method is present), never an ``isinstance`` against a
wrapper class, so a new wrapper that follows a known convention works without
changes here, and one that does not can be taught with a step of its own,
passed explicitly where it is needed (there is no global registry to mutate).
"""

from __future__ import annotations

import inspect
import itertools
from collections import deque
from typing import TYPE_CHECKING, Final, TypeGuard

import attrs

from moe_protocols.adapters._hf import HF_EXPERTS_STEP, HF_GET_DECODER_STEP
from moe_protocols.adapters._step import UnwrapStep, attribute_probe, method_probe
from moe_protocols.adapters._trace import ROOT_PATH, ResolutionTrace, TraceEntry, TraceOutcome
from moe_protocols.conformance import ConformanceReport, check_conformance
from moe_protocols.errors import ResolutionConfigError
from moe_protocols.protocols import COUNT_MEMBERS

if TYPE_CHECKING:
    from collections.abc import Sequence

    from moe_protocols.protocols import MixtureOfExperts

__all__ = ["DEFAULT_UNWRAP_STEPS", "UnwrapStep", "walk"]


DEFAULT_UNWRAP_STEPS: Final[tuple[UnwrapStep, ...]] = (
    UnwrapStep(
        "get_language_model()",
        method_probe("get_language_model"),
        "the multimodal convention (vLLM SupportsMultiModal): the wrapped language model; "
        "NotImplementedError is recorded and the walk goes on",
    ),
    UnwrapStep("._orig_mod", attribute_probe("_orig_mod"), "torch.compile's OptimizedModule"),
    UnwrapStep(
        ".module", attribute_probe("module"), "DistributedDataParallel, DataParallel, FSDP1"
    ),
    UnwrapStep("get_base_model()", method_probe("get_base_model"), "PEFT's PeftModel"),
    UnwrapStep(".language_model", attribute_probe("language_model"), "VLM wrappers' attribute"),
    UnwrapStep(
        ".model.language_model",
        attribute_probe("model", "language_model"),
        "wrappers that keep the VLM core under .model (transformers-style)",
    ),
    UnwrapStep(".thinker", attribute_probe("thinker"), "omni-style models (thinker/talker)"),
    HF_GET_DECODER_STEP,
    HF_EXPERTS_STEP,
)
"""The built-in steps, in the order they are tried at each level.

To add one, pass ``steps=(*DEFAULT_UNWRAP_STEPS, UnwrapStep(".decoder", ...))``
to ``MoEView.resolve`` / ``require``: the extension is local to that call.
"""


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


@attrs.frozen
class _Candidate:
    obj: object
    path: str
    depth: int
    step: str


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

    Bounded by ``max_depth`` (objects deeper than that are not reached) and
    ``max_candidates`` (objects checked, the root included): a mock answers
    every probe with a new object, so the tree can be infinite. Cycle-safe:
    an object already seen (by identity) is recorded, not revisited. Nothing
    is written to any object; probes only read attributes and call the
    unwrapping methods.
    """
    steps = _checked_steps(steps)
    _check_limit("max_depth", max_depth, minimum=0)
    _check_limit("max_candidates", max_candidates, minimum=1)
    entries: list[TraceEntry] = []
    seen: dict[int, str] = {id(root): ROOT_PATH}
    # Holding every seen object keeps its id from being reused by a new
    # temporary a later probe returns, which would fake an "already visited".
    alive: list[object] = [root]
    queue = deque([_Candidate(root, ROOT_PATH, 0, "")])
    budget_spent = False
    step_names = tuple(step.name for step in steps)

    def record(depth: int, path: str, step: str, outcome: TraceOutcome, detail: str) -> None:
        entries.append(TraceEntry(depth, path, step, outcome, detail))

    # A forwarding wrapper that conforms: (its entry's index, itself), to come back to.
    forwarding: tuple[int, MixtureOfExperts] | None = None

    while queue:
        candidate = queue.popleft()
        obj = candidate.obj
        report = check_conformance(obj, path=candidate.path)
        if _is_moe(obj, report):
            if forwarding is None and _forwards_counts(obj):
                detail = report.summary() + (
                    "; only through __getattr__ forwarding: looking for the model behind it"
                )
                entries.append(
                    TraceEntry(
                        candidate.depth,
                        candidate.path,
                        candidate.step,
                        TraceOutcome.FORWARDS,
                        detail,
                        report,
                    )
                )
                forwarding = (len(entries) - 1, obj)
            else:
                entries.append(
                    TraceEntry(
                        candidate.depth,
                        candidate.path,
                        candidate.step,
                        TraceOutcome.RESOLVED,
                        report.summary(),
                        report,
                    )
                )
                for waiting in queue:
                    record(
                        waiting.depth,
                        waiting.path,
                        waiting.step,
                        TraceOutcome.NOT_CHECKED,
                        f"{waiting.path} ({type(waiting.obj).__qualname__})",
                    )
                return obj, ResolutionTrace(tuple(entries), step_names)
        else:
            entries.append(
                TraceEntry(
                    candidate.depth,
                    candidate.path,
                    candidate.step,
                    TraceOutcome.CANDIDATE_REJECTED,
                    report.summary(),
                    report,
                )
            )
        if budget_spent or issubclass(type(candidate.obj), type):
            continue  # a class is not a served model: its attributes are not unwrapped
        depth = candidate.depth + 1
        if depth > max_depth:
            record(
                depth,
                candidate.path,
                "",
                TraceOutcome.DEPTH_LIMIT,
                f"{candidate.path} not unwrapped further (max_depth={max_depth})",
            )
            continue
        for step in steps:
            path = _join(candidate.path, step.name)
            try:
                inner = step.probe(candidate.obj)
            except Exception as exc:
                record(depth, path, step.name, TraceOutcome.RAISED, _describe_exception(exc))
                continue
            if inner is None:
                record(depth, path, step.name, TraceOutcome.NOT_APPLICABLE, "")
            elif inner is candidate.obj:
                record(depth, path, step.name, TraceOutcome.ALREADY_VISITED, "the object itself")
            elif id(inner) in seen:
                detail = f"same object as {seen[id(inner)]}"
                record(depth, path, step.name, TraceOutcome.ALREADY_VISITED, detail)
            elif len(seen) >= max_candidates:
                budget_spent = True
                detail = (
                    f"{step.name} from {candidate.path} and any later steps not probed: "
                    f"max_candidates={max_candidates} objects already found"
                )
                record(depth, path, step.name, TraceOutcome.BUDGET_EXHAUSTED, detail)
                break
            else:
                seen[id(inner)] = path
                alive.append(inner)
                queue.append(_Candidate(inner, path, depth, step.name))
    if forwarding is not None:
        index, wrapper = forwarding
        entry = entries[index]
        summary = entry.report.summary() if entry.report is not None else entry.detail
        entries[index] = attrs.evolve(entry, outcome=TraceOutcome.RESOLVED, detail=summary)
        return wrapper, ResolutionTrace(tuple(entries), step_names)
    return None, ResolutionTrace(tuple(entries), step_names)
