"""The checks of whole models and of MoE layers: members, methods, layers and invariants.

Every check reads attributes and inspects signatures only (it never calls a
checked method, never mutates the object), and an exception anywhere inside
becomes a problem in the report: the checks never raise.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Protocol, cast, runtime_checkable

from moe_protocols.conformance._bounds import MAX_LAYERS_CHECKED, Budget, capped, over_budget
from moe_protocols.conformance._read import (
    MISSING,
    describe,
    describe_exception,
    guarded,
    is_class,
    is_text,
    item,
    read,
    subject,
)
from moe_protocols.conformance._report import (
    MIXTURE_OF_EXPERTS,
    MOE_LAYER,
    ConformanceReport,
    Problem,
    ProblemKind,
)
from moe_protocols.conformance._weights import check_expert_weights
from moe_protocols.protocols import COUNT_MEMBERS, LAYER_METHODS, MODEL_METHODS

__all__ = ["check_conformance", "check_layer_conformance"]


@runtime_checkable
class _SizedIndexable(Protocol):
    """What ``moe_layers`` must offer: ``len()`` and indexing (a list, tuple, ModuleList)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> object: ...


def check_conformance(obj: object, *, path: str = "model") -> ConformanceReport:
    """Check ``obj`` against ``MixtureOfExperts`` and report every problem; never raises.

    Checked: every member is present and readable; the counts are ``int``
    (not ``bool``) and >= 0; ``expert_weights`` is a mutable sequence (a list)
    of sequences of tensors, one per MoE layer once filled, each tensor
    ``[local_physical, ...]``; ``moe_layers`` is a sized, indexable,
    re-iterable sequence (never a generator, which is not consumed) whose
    items satisfy ``MoELayer``; the methods accept the keyword arguments a
    runner passes; and, where the counts involved are valid,
    ``physical == logical + redundant``, ``routed == logical``,
    ``len(moe_layers) == num_moe_layers`` and ``physical % local_physical == 0``
    with ``local_physical > 0`` (the last is waived for a dense model,
    ``num_moe_layers == 0``).

    Bounded for any input: sequences are read by index (never iterated, so
    one that never ends is not a hang), at most 4096 layers and 256 weights
    per layer are checked (more is a problem), and a check that runs past 5 s
    stops with a problem saying so.
    """
    try:
        if is_class(obj):
            return ConformanceReport(
                subject=subject(obj),
                path=path,
                protocol=MIXTURE_OF_EXPERTS,
                problems=(_not_instance(obj, MIXTURE_OF_EXPERTS),),
            )
        return _check_model(obj, path)
    except Exception as exc:  # defensive: the promise is "never raises"
        return _failed_report(obj, path, MIXTURE_OF_EXPERTS, exc)


def _check_model(obj: object, path: str) -> ConformanceReport:
    budget = Budget()
    read_problems: list[Problem] = []
    expert_weights = read(obj, "expert_weights", read_problems)
    raw_counts = {name: read(obj, name, read_problems) for name in COUNT_MEMBERS}
    moe_layers = read(obj, "moe_layers", read_problems)

    # Problems are listed in protocol member order, then the invariants.
    by_member: dict[str, list[Problem]] = {}
    for problem in read_problems:
        by_member.setdefault(problem.member, []).append(problem)

    counts: dict[str, int | None] = {}
    for name, value in raw_counts.items():
        found = by_member.setdefault(name, [])
        if value is not MISSING:
            counts[name] = guarded(name, found, partial(_check_count, name, value, found))

    weights_found = by_member.setdefault("expert_weights", [])
    weights_invariants: list[Problem] = []
    if expert_weights is not MISSING:
        check_weights = partial(
            check_expert_weights, expert_weights, counts, weights_found, weights_invariants, budget
        )
        guarded("expert_weights", weights_found, check_weights)

    layers_found = by_member.setdefault("moe_layers", [])
    num_layers: int | None = None  # len(moe_layers), when it could be taken
    if moe_layers is not MISSING:
        check_layers = partial(_check_moe_layers, moe_layers, path, layers_found, budget)
        num_layers = guarded("moe_layers", layers_found, check_layers)

    method_problems: list[Problem] = []
    _check_methods(obj, MODEL_METHODS, method_problems)

    problems: list[Problem] = list(by_member["expert_weights"])
    for name in COUNT_MEMBERS:
        problems += by_member[name]
    problems += by_member["moe_layers"]
    problems += method_problems
    problems += weights_invariants
    problems += _invariants(counts, num_layers)
    return ConformanceReport(
        subject=subject(obj),
        path=path,
        protocol=MIXTURE_OF_EXPERTS,
        problems=tuple(problems),
        num_moe_layers=counts.get("num_moe_layers"),
    )


def _check_moe_layers(value: object, path: str, found: list[Problem], budget: Budget) -> int | None:
    """A sized, indexable, re-iterable sequence of ``MoELayer``; iterators are never consumed.

    Returns ``len(moe_layers)`` when it could be taken.
    """
    kind = type(value)
    if isinstance(value, Iterator):
        found.append(
            Problem(
                "moe_layers",
                ProblemKind.WRONG_TYPE,
                "must be a sequence (a list, tuple or nn.ModuleList), got the one-shot iterator "
                f"{describe(cast('object', value))}, which would be exhausted after one use",
            )
        )
        return None
    # __len__/__getitem__ are looked up on the type, as len() and [] do: an
    # instance __getattr__ that answers every name must not pass for them.
    if (
        is_text(value)
        or isinstance(value, Mapping)
        or not callable(getattr(kind, "__len__", None))
        or not callable(getattr(kind, "__getitem__", None))
        or not isinstance(value, _SizedIndexable)
    ):
        found.append(
            Problem(
                "moe_layers",
                ProblemKind.WRONG_TYPE,
                "must be a sequence of MoE layers (a list, tuple or nn.ModuleList), "
                f"got {describe(value)}",  # pyright: ignore[reportUnknownArgumentType]  # any object
            )
        )
        return None
    try:
        length = len(value)
    except Exception as exc:
        found.append(
            Problem("moe_layers", ProblemKind.RAISED, f"len() raised {describe_exception(exc)}")
        )
        return None
    layer_problems: list[Problem] = []
    if length > MAX_LAYERS_CHECKED:
        found.append(
            Problem(
                "moe_layers",
                ProblemKind.INVALID_VALUE,
                f"holds {length} layers, more than the {MAX_LAYERS_CHECKED} a model may have",
            )
        )
    for idx in range(min(length, MAX_LAYERS_CHECKED)):
        member = f"moe_layers[{idx}]"
        if budget.spent():
            layer_problems.append(over_budget("moe_layers"))
            break
        layer = item(value, idx, member, layer_problems)
        if layer is MISSING:
            continue
        report = check_layer_conformance(layer, path=f"{path}.{member}")
        for problem in report.problems:
            nested = f"{member}.{problem.member}" if problem.member else member
            layer_problems.append(Problem(nested, problem.kind, problem.detail))
    found += capped(layer_problems, "moe_layers", "layer problems")
    return length


def _invariants(counts: Mapping[str, int | None], num_layers: int | None) -> list[Problem]:
    """Relations between counts, checked only where every count involved is valid."""
    problems: list[Problem] = []

    def broken(detail: str) -> None:
        problems.append(Problem("invariant", ProblemKind.INVARIANT, detail))

    moe = counts.get("num_moe_layers")
    logical = counts.get("num_logical_experts")
    physical = counts.get("num_physical_experts")
    local = counts.get("num_local_physical_experts")
    routed = counts.get("num_routed_experts")
    redundant = counts.get("num_redundant_experts")
    if (
        physical is not None
        and logical is not None
        and redundant is not None
        and physical != logical + redundant
    ):
        broken(
            f"num_physical_experts ({physical}) must equal num_logical_experts ({logical}) "
            f"+ num_redundant_experts ({redundant})"
        )
    if routed is not None and logical is not None and routed != logical:
        broken(f"num_routed_experts ({routed}) must equal num_logical_experts ({logical})")
    if moe is not None and num_layers is not None and num_layers != moe:
        broken(f"len(moe_layers) ({num_layers}) must equal num_moe_layers ({moe})")
    if local is not None:
        if local == 0 and moe != 0:
            broken("num_local_physical_experts must be > 0 (each EP rank holds expert slots)")
        elif local > 0 and physical is not None and physical % local != 0:
            broken(
                f"num_physical_experts ({physical}) must be a multiple of "
                f"num_local_physical_experts ({local}) (the same slots on every EP rank)"
            )
    return problems


def check_layer_conformance(layer: object, *, path: str) -> ConformanceReport:
    """Check one MoE layer against ``MoELayer``; never raises.

    ``get_expert_weights`` must be callable with no arguments and
    ``set_eplb_state`` with ``moe_layer_idx``, ``expert_load_view``,
    ``logical_to_physical_map`` and ``logical_replica_count`` as keywords.
    Neither is called.
    """
    try:
        name = subject(layer)
        if is_class(layer):
            return ConformanceReport(
                subject=name,
                path=path,
                protocol=MOE_LAYER,
                problems=(_not_instance(layer, MOE_LAYER),),
            )
        problems: list[Problem] = []
        _check_methods(layer, LAYER_METHODS, problems)
        return ConformanceReport(
            subject=name, path=path, protocol=MOE_LAYER, problems=tuple(problems)
        )
    except Exception as exc:  # defensive: the promise is "never raises"
        return _failed_report(layer, path, MOE_LAYER, exc)


def _check_methods(
    obj: object, methods: tuple[tuple[str, tuple[str, ...]], ...], problems: list[Problem]
) -> None:
    for name, keywords in methods:
        value = read(obj, name, problems)
        if value is not MISSING:
            guarded(name, problems, partial(_check_method, name, value, keywords, problems))


def _check_method(
    name: str, value: object, keywords: tuple[str, ...], problems: list[Problem]
) -> None:
    """Method ``name`` must be callable with exactly the keyword arguments a runner passes."""
    if not callable(value):
        problems.append(
            Problem(name, ProblemKind.NOT_CALLABLE, f"must be a method, got {describe(value)}")
        )
        return
    try:
        signature = inspect.signature(value)
    except (ValueError, TypeError):
        return  # a builtin without introspectable signature: give it the benefit of the doubt
    except Exception as exc:
        problems.append(
            Problem(
                name,
                ProblemKind.RAISED,
                f"inspecting its signature raised {describe_exception(exc)}",
            )
        )
        return
    try:
        signature.bind(**dict.fromkeys(keywords))
    except TypeError as exc:
        called = (
            f"with keyword arguments ({', '.join(keywords)})" if keywords else "with no arguments"
        )
        problems.append(
            Problem(
                name,
                ProblemKind.BAD_SIGNATURE,
                f"cannot be called {called}: {exc}; its signature is {name}{_bare(signature)}",
            )
        )


def _bare(signature: inspect.Signature) -> inspect.Signature:
    """The signature without annotations: the parameter names are what matter here."""
    return signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=signature.empty,
    )


def _check_count(name: str, value: object, problems: list[Problem]) -> int | None:
    """Return the count when it is a valid one (an int, not a bool, >= 0)."""
    if type(value) is bool or not isinstance(value, int):
        problems.append(
            Problem(name, ProblemKind.WRONG_TYPE, f"must be an int, got {describe(value)}")
        )
        return None
    count = int(value)
    if count < 0:
        problems.append(Problem(name, ProblemKind.INVALID_VALUE, f"must be >= 0, got {count}"))
        return None
    return count


def _not_instance(obj: object, protocol: str) -> Problem:
    """The problem of a class given where an instance belongs."""
    return Problem(
        "",
        ProblemKind.NOT_INSTANCE,
        f"is the class {subject(obj)} itself, not an instance of it; {protocol} is checked "
        "on instances",
    )


def _failed_report(obj: object, path: str, protocol: str, exc: Exception) -> ConformanceReport:
    """The report of a check that raised after all (kept so that the check never raises)."""
    return ConformanceReport(
        subject=subject(obj),
        path=path,
        protocol=protocol,
        problems=(
            Problem(
                "",
                ProblemKind.RAISED,
                f"checking the object raised {describe_exception(exc)}",
            ),
        ),
    )
