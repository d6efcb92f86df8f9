"""Check an object against the contract and explain every way it falls short.

``check_conformance(obj)`` answers "is this a ``MixtureOfExperts``?" with a
report instead of a bool: it lists every missing member, wrongly typed or
invalid count, badly shaped ``expert_weights`` entry, non-conforming MoE layer,
uncallable method, signature a runner cannot call by keyword, and broken
invariant, so a model author can fix them all at once.

It never raises (whatever ``obj`` is: a mock, a class, ``None``, an object
whose properties raise), never mutates the object, and never calls the
methods it checks: it only reads attributes and inspects signatures.
"""

from __future__ import annotations

import enum
import inspect
import time
from collections.abc import Callable, Iterator, Mapping, MutableSequence, Sequence
from functools import partial
from typing import Final, Protocol, TypeVar, cast, runtime_checkable

import attrs
import torch

from moe_protocols.protocols import COUNT_MEMBERS, LAYER_METHODS, MODEL_MEMBERS, MODEL_METHODS

__all__ = [
    "ConformanceReport",
    "Problem",
    "ProblemKind",
    "check_conformance",
    "check_layer_conformance",
]

MIXTURE_OF_EXPERTS: Final = "MixtureOfExperts"
MOE_LAYER: Final = "MoELayer"

# The member lists (COUNT_MEMBERS, MODEL_MEMBERS, MODEL_METHODS, LAYER_METHODS)
# come from ``protocols``, read off the classes there; import them from there.


# Element-level problems (one per layer or tensor) are listed up to this many
# per collection, then counted in one summary problem: a 60-layer model with
# the same fault everywhere should not bury the other findings.
_MAX_ITEM_PROBLEMS: Final = 12
# Layers beyond this index are not checked: no real model has that many MoE
# layers, and a hostile ``__len__`` must not make the check run for ever.
_MAX_LAYERS_CHECKED: Final = 4096
# Weight tensors checked per layer of ``expert_weights`` (real layers have 2 or 3).
_MAX_WEIGHTS_CHECKED: Final = 256
# Wall-clock budget of one check: sequences whose items are slow to produce
# (or that never end) turn into a problem instead of a hang.
_TIME_BUDGET_S: Final = 5.0
_REPR_LIMIT: Final = 80

_T = TypeVar("_T")


@attrs.define
class _Budget:
    """The time one ``check_conformance`` call may take; ``spent()`` once it is over."""

    deadline: float = attrs.field(factory=lambda: time.monotonic() + _TIME_BUDGET_S)

    def spent(self) -> bool:
        return time.monotonic() > self.deadline


def _over_budget(member: str) -> Problem:
    return Problem(
        member,
        ProblemKind.INVALID_VALUE,
        f"checking it took longer than {_TIME_BUDGET_S:g} s (items that are slow to produce, "
        "or a sequence that never ends); the rest was not checked",
    )


@runtime_checkable
class _SizedIndexable(Protocol):
    """What ``moe_layers`` must offer: ``len()`` and indexing (a list, tuple, ModuleList)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> object: ...


class ProblemKind(enum.Enum):
    """What is wrong with one member of a checked object."""

    MISSING = "missing"
    WRONG_TYPE = "wrong type"
    INVALID_VALUE = "invalid value"
    NOT_CALLABLE = "not callable"
    BAD_SIGNATURE = "bad signature"
    INVARIANT = "invariant violated"
    RAISED = "raised"
    """Reading the member raised an exception."""
    NOT_INSTANCE = "not an instance"
    """A class was given where an instance was expected."""


@attrs.frozen
class Problem:
    """One way an object fails a protocol: which member, what kind of fault, and the details.

    ``member`` is a member name (``"num_redundant_experts"``), a path into a
    member (``"moe_layers[2].set_eplb_state"``, ``"expert_weights[0][1]"``),
    ``"invariant"`` for a relation between counts, or ``""`` when the fault is
    the object itself (a class instead of an instance).
    """

    member: str = attrs.field(validator=attrs.validators.instance_of(str))
    kind: ProblemKind = attrs.field(validator=attrs.validators.instance_of(ProblemKind))
    detail: str = attrs.field(validator=attrs.validators.instance_of(str))

    @property
    def brief(self) -> str:
        """A short form for one-line summaries (``"missing expert_weights"``)."""
        if self.kind is ProblemKind.MISSING:
            return f"missing {self.member}"
        return _truncate(str(self), 100)

    def __str__(self) -> str:
        return f"{self.member}: {self.detail}" if self.member else self.detail


@attrs.frozen(kw_only=True)
class ConformanceReport:
    """The verdict on one object: every problem found, and its MoE layer count when valid.

    ``subject`` is the object's class name, ``path`` where it sits relative to
    the served model (``"model.get_language_model()"``), ``protocol`` the
    protocol checked (``"MixtureOfExperts"`` or ``"MoELayer"``).
    """

    subject: str = attrs.field(validator=attrs.validators.instance_of(str))
    path: str = attrs.field(default="model", validator=attrs.validators.instance_of(str))
    protocol: str = attrs.field(validator=attrs.validators.in_((MIXTURE_OF_EXPERTS, MOE_LAYER)))
    problems: tuple[Problem, ...] = attrs.field(
        default=(),
        validator=attrs.validators.deep_iterable(
            member_validator=attrs.validators.instance_of(Problem),
            iterable_validator=attrs.validators.instance_of(tuple),
        ),
    )
    num_moe_layers: int | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.instance_of(int)),
    )
    """``num_moe_layers`` when it was a valid count (a non-negative int), else None."""

    @property
    def ok(self) -> bool:
        """True when the object satisfies the protocol (no problems at all)."""
        return not self.problems

    @property
    def is_moe(self) -> bool:
        """True when the object satisfies ``MixtureOfExperts`` and has at least one MoE layer."""
        return (
            self.ok
            and self.protocol == MIXTURE_OF_EXPERTS
            and self.num_moe_layers is not None
            and self.num_moe_layers > 0
        )

    @property
    def lacks_every_member(self) -> bool:
        """True when the object has none of the protocol's members (a plain wrapper, say)."""
        members = MODEL_MEMBERS if self.protocol == MIXTURE_OF_EXPERTS else ()
        return bool(members) and (
            all(p.kind is ProblemKind.MISSING for p in self.problems)
            and {p.member for p in self.problems} == set(members)
        )

    def summary(self) -> str:
        """One line: the verdict and the first few problems (used in resolution traces)."""
        if self.ok:
            return f"{self.protocol}{self._verdict_suffix()}"
        shown = "; ".join(p.brief for p in self.problems[:3])
        more = len(self.problems) - 3
        return f"not {self.protocol}: {shown}" + (f" (+{more} more)" if more > 0 else "")

    def _verdict_suffix(self) -> str:
        if self.protocol != MIXTURE_OF_EXPERTS or self.num_moe_layers is None:
            return ""
        if self.num_moe_layers == 0:
            return " but has num_moe_layers == 0 (a dense model)"
        plural = "" if self.num_moe_layers == 1 else "s"
        return f" ({self.num_moe_layers} MoE layer{plural})"

    def __str__(self) -> str:
        where = f"{self.path} ({self.subject})"
        if self.ok:
            return f"{where} satisfies {self.protocol}{self._verdict_suffix()}"
        lines = [f"{where} does not satisfy {self.protocol}:"]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)


# --------------------------------------------------------------------- helpers


class _Missing(enum.Enum):
    """Marks a member that could not be read (missing, or reading it raised)."""

    TOKEN = 0


_MISSING: Final = _Missing.TOKEN


def _truncate(text: str, limit: int = _REPR_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: object) -> str:
    # type() cannot be fooled by a __class__ property, unlike value.__class__.
    try:
        return type(value).__qualname__
    except Exception:
        return "<unknown type>"


def _describe(value: object) -> str:
    """``"float 1.5"``, ``"Tensor of shape [4, 8] (torch.float32)"``: a value for a message."""
    try:
        if isinstance(value, torch.Tensor):
            return f"Tensor of shape {list(value.shape)} ({value.dtype})"
        return f"{_type_name(value)} {_truncate(repr(value))}"
    except Exception as exc:
        return f"{_type_name(value)} (repr raised {_describe_exception(exc)})"


def _describe_exception(exc: BaseException) -> str:
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable message>"
    name = _type_name(exc)
    return f"{name}: {_truncate(message, 160)}" if message else name


def _is_class(value: object) -> bool:
    # Decided from type(), which a hostile __class__ cannot change.
    return issubclass(type(value), type)


def _defined_statically(obj: object, name: str) -> bool:
    """Whether ``name`` exists without running code (a property, a slot, an instance attribute)."""
    try:
        inspect.getattr_static(obj, name)
    except Exception:
        return False
    return True


def _read(obj: object, name: str, problems: list[Problem]) -> object:
    """Read ``obj.name``; on failure append MISSING or RAISED and return ``_MISSING``."""
    try:
        return getattr(obj, name)
    except AttributeError as exc:
        if _defined_statically(obj, name):
            # A property that exists but raised AttributeError is a fault of
            # the property, not a missing member: say what it raised.
            problems.append(
                Problem(name, ProblemKind.RAISED, f"reading it raised {_describe_exception(exc)}")
            )
        else:
            problems.append(Problem(name, ProblemKind.MISSING, "missing"))
    except Exception as exc:
        problems.append(
            Problem(name, ProblemKind.RAISED, f"reading it raised {_describe_exception(exc)}")
        )
    return _MISSING


def _item(sequence: object, index: int, member: str, problems: list[Problem]) -> object:
    """``sequence[index]``, or ``_MISSING`` after a RAISED problem on ``member`` when it raises."""
    try:
        return sequence[index]  # type: ignore[index]  # checked to be a sequence by the caller
    except Exception as exc:
        problems.append(
            Problem(member, ProblemKind.RAISED, f"indexing raised {_describe_exception(exc)}")
        )
        return _MISSING


def _guarded(member: str, problems: list[Problem], check: Callable[[], _T]) -> _T | None:
    """Run one check; an exception inside it becomes a RAISED problem on ``member``."""
    try:
        return check()
    except Exception as exc:
        problems.append(
            Problem(member, ProblemKind.RAISED, f"checking it raised {_describe_exception(exc)}")
        )
        return None


def _capped(problems: list[Problem], member: str, what: str) -> list[Problem]:
    """At most ``_MAX_ITEM_PROBLEMS`` element problems, plus one that counts the rest."""
    if len(problems) <= _MAX_ITEM_PROBLEMS:
        return problems
    rest = len(problems) - _MAX_ITEM_PROBLEMS
    kinds = sorted({p.kind.value for p in problems[_MAX_ITEM_PROBLEMS:]})
    summary = Problem(member, problems[-1].kind, f"{rest} more {what} ({', '.join(kinds)})")
    return [*problems[:_MAX_ITEM_PROBLEMS], summary]


def _check_count(name: str, value: object, problems: list[Problem]) -> int | None:
    """Return the count when it is a valid one (an int, not a bool, >= 0)."""
    if type(value) is bool or not isinstance(value, int):
        problems.append(
            Problem(name, ProblemKind.WRONG_TYPE, f"must be an int, got {_describe(value)}")
        )
        return None
    count = int(value)
    if count < 0:
        problems.append(Problem(name, ProblemKind.INVALID_VALUE, f"must be >= 0, got {count}"))
        return None
    return count


def _check_method(
    name: str, value: object, keywords: tuple[str, ...], problems: list[Problem]
) -> None:
    """Method ``name`` must be callable with exactly the keyword arguments a runner passes."""
    if not callable(value):
        problems.append(
            Problem(name, ProblemKind.NOT_CALLABLE, f"must be a method, got {_describe(value)}")
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
                f"inspecting its signature raised {_describe_exception(exc)}",
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


def _subject(obj: object) -> str:
    """The class name shown in reports: the object's class, or the class itself if given one."""
    if _is_class(obj):
        try:
            name = getattr(obj, "__qualname__", None)
        except Exception:
            name = None
        return name if isinstance(name, str) else _type_name(obj)
    return _type_name(obj)


def _not_instance(obj: object, protocol: str) -> Problem:
    return Problem(
        "",
        ProblemKind.NOT_INSTANCE,
        f"is the class {_subject(obj)} itself, not an instance of it; {protocol} is checked "
        "on instances",
    )


# ------------------------------------------------------------------ MoE layers


def check_layer_conformance(layer: object, *, path: str) -> ConformanceReport:
    """Check one MoE layer against ``MoELayer``; never raises.

    ``get_expert_weights`` must be callable with no arguments and
    ``set_eplb_state`` with ``moe_layer_idx``, ``expert_load_view``,
    ``logical_to_physical_map`` and ``logical_replica_count`` as keywords.
    Neither is called.
    """
    try:
        subject = _subject(layer)
        if _is_class(layer):
            return ConformanceReport(
                subject=subject,
                path=path,
                protocol=MOE_LAYER,
                problems=(_not_instance(layer, MOE_LAYER),),
            )
        problems: list[Problem] = []
        _check_methods(layer, LAYER_METHODS, problems)
        return ConformanceReport(
            subject=subject, path=path, protocol=MOE_LAYER, problems=tuple(problems)
        )
    except Exception as exc:  # defensive: the promise is "never raises"
        return _failed_report(layer, path, MOE_LAYER, exc)


def _check_methods(
    obj: object, methods: tuple[tuple[str, tuple[str, ...]], ...], problems: list[Problem]
) -> None:
    for name, keywords in methods:
        value = _read(obj, name, problems)
        if value is not _MISSING:
            _guarded(name, problems, partial(_check_method, name, value, keywords, problems))


def _failed_report(obj: object, path: str, protocol: str, exc: Exception) -> ConformanceReport:
    return ConformanceReport(
        subject=_subject(obj),
        path=path,
        protocol=protocol,
        problems=(
            Problem(
                "",
                ProblemKind.RAISED,
                f"checking the object raised {_describe_exception(exc)}",
            ),
        ),
    )


# --------------------------------------------------------------- whole models


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
        if _is_class(obj):
            return ConformanceReport(
                subject=_subject(obj),
                path=path,
                protocol=MIXTURE_OF_EXPERTS,
                problems=(_not_instance(obj, MIXTURE_OF_EXPERTS),),
            )
        return _check_model(obj, path)
    except Exception as exc:  # defensive: the promise is "never raises"
        return _failed_report(obj, path, MIXTURE_OF_EXPERTS, exc)


def _check_model(obj: object, path: str) -> ConformanceReport:
    budget = _Budget()
    read_problems: list[Problem] = []
    expert_weights = _read(obj, "expert_weights", read_problems)
    raw_counts = {name: _read(obj, name, read_problems) for name in COUNT_MEMBERS}
    moe_layers = _read(obj, "moe_layers", read_problems)

    # Problems are listed in protocol member order, then the invariants.
    by_member: dict[str, list[Problem]] = {}
    for problem in read_problems:
        by_member.setdefault(problem.member, []).append(problem)

    counts: dict[str, int | None] = {}
    for name, value in raw_counts.items():
        found = by_member.setdefault(name, [])
        if value is not _MISSING:
            counts[name] = _guarded(name, found, partial(_check_count, name, value, found))

    weights_found = by_member.setdefault("expert_weights", [])
    weights_invariants: list[Problem] = []
    if expert_weights is not _MISSING:
        check_weights = partial(
            _check_expert_weights, expert_weights, counts, weights_found, weights_invariants, budget
        )
        _guarded("expert_weights", weights_found, check_weights)

    layers_found = by_member.setdefault("moe_layers", [])
    num_layers: int | None = None  # len(moe_layers), when it could be taken
    if moe_layers is not _MISSING:
        check_layers = partial(_check_moe_layers, moe_layers, path, layers_found, budget)
        num_layers = _guarded("moe_layers", layers_found, check_layers)

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
        subject=_subject(obj),
        path=path,
        protocol=MIXTURE_OF_EXPERTS,
        problems=tuple(problems),
        num_moe_layers=counts.get("num_moe_layers"),
    )


def _is_text(value: object) -> bool:
    return isinstance(value, (str, bytes, bytearray))


def _check_expert_weights(
    value: object,
    counts: Mapping[str, int | None],
    found: list[Problem],
    invariants: list[Problem],
    budget: _Budget,
) -> None:
    """``MutableSequence[Sequence[Tensor]]``: per layer, that layer's ``[local_physical, ...]``."""
    if not isinstance(value, MutableSequence):
        found.append(
            Problem(
                "expert_weights",
                ProblemKind.WRONG_TYPE,
                "must be a mutable sequence (a list) with one sequence of tensors per MoE layer, "
                f"got {_describe(value)}",
            )
        )
        return
    value = cast("MutableSequence[object]", value)  # items are checked one by one below
    num_moe_layers = counts.get("num_moe_layers")
    length = len(value)
    if length and num_moe_layers is not None and length != num_moe_layers:
        invariants.append(
            Problem(
                "expert_weights",
                ProblemKind.INVARIANT,
                f"holds {length} layers of weights but num_moe_layers is {num_moe_layers}",
            )
        )
    if length > _MAX_LAYERS_CHECKED:
        found.append(
            Problem(
                "expert_weights",
                ProblemKind.INVALID_VALUE,
                f"holds {length} layers, more than the {_MAX_LAYERS_CHECKED} a model may have",
            )
        )
    local = counts.get("num_local_physical_experts")
    items: list[Problem] = []
    shapes: list[Problem] = []
    # By index, never by iteration: a sequence whose __getitem__ never raises
    # IndexError iterates for ever.
    for layer_idx in range(min(length, _MAX_LAYERS_CHECKED)):
        member = f"expert_weights[{layer_idx}]"
        if budget.spent():
            items.append(_over_budget("expert_weights"))
            break
        layer_weights = _item(value, layer_idx, member, items)
        if layer_weights is _MISSING:
            continue
        if _is_text(layer_weights) or not isinstance(layer_weights, Sequence):
            items.append(
                Problem(
                    member,
                    ProblemKind.WRONG_TYPE,
                    f"must be a sequence of tensors, got {_describe(layer_weights)}",
                )
            )
            continue
        layer_weights = cast("Sequence[object]", layer_weights)
        try:
            num_weights = len(layer_weights)
            weights = [layer_weights[k] for k in range(min(num_weights, _MAX_WEIGHTS_CHECKED))]
        except Exception as exc:
            items.append(
                Problem(member, ProblemKind.RAISED, f"reading it raised {_describe_exception(exc)}")
            )
            continue
        if num_weights > _MAX_WEIGHTS_CHECKED:
            items.append(
                Problem(
                    member,
                    ProblemKind.INVALID_VALUE,
                    f"holds {num_weights} weight tensors, more than the {_MAX_WEIGHTS_CHECKED} "
                    "a MoE layer may have",
                )
            )
        for k, weight in enumerate(weights):
            if not isinstance(weight, torch.Tensor):
                items.append(
                    Problem(
                        f"{member}[{k}]",
                        ProblemKind.WRONG_TYPE,
                        f"must be a torch.Tensor, got {_describe(weight)}",
                    )
                )
            elif weight.dim() == 0:
                items.append(
                    Problem(
                        f"{member}[{k}]",
                        ProblemKind.INVALID_VALUE,
                        "must be [local_physical, ...], got a 0-dim tensor",
                    )
                )
            elif local is not None and weight.shape[0] != local:
                shapes.append(
                    Problem(
                        f"{member}[{k}]",
                        ProblemKind.INVARIANT,
                        f"dim 0 is {weight.shape[0]} but num_local_physical_experts is {local} "
                        f"(shape {list(weight.shape)})",
                    )
                )
    found += _capped(items, "expert_weights", "malformed entries")
    invariants += _capped(shapes, "expert_weights", "tensors with the wrong dim 0")


def _check_moe_layers(
    value: object, path: str, found: list[Problem], budget: _Budget
) -> int | None:
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
                f"{_describe(cast('object', value))}, which would be exhausted after one use",
            )
        )
        return None
    # __len__/__getitem__ are looked up on the type, as len() and [] do: an
    # instance __getattr__ that answers every name must not pass for them.
    if (
        _is_text(value)
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
                f"got {_describe(value)}",  # pyright: ignore[reportUnknownArgumentType]  # any object
            )
        )
        return None
    try:
        length = len(value)
    except Exception as exc:
        found.append(
            Problem("moe_layers", ProblemKind.RAISED, f"len() raised {_describe_exception(exc)}")
        )
        return None
    layer_problems: list[Problem] = []
    if length > _MAX_LAYERS_CHECKED:
        found.append(
            Problem(
                "moe_layers",
                ProblemKind.INVALID_VALUE,
                f"holds {length} layers, more than the {_MAX_LAYERS_CHECKED} a model may have",
            )
        )
    for idx in range(min(length, _MAX_LAYERS_CHECKED)):
        member = f"moe_layers[{idx}]"
        if budget.spent():
            layer_problems.append(_over_budget("moe_layers"))
            break
        layer = _item(value, idx, member, layer_problems)
        if layer is _MISSING:
            continue
        report = check_layer_conformance(layer, path=f"{path}.{member}")
        for problem in report.problems:
            nested = f"{member}.{problem.member}" if problem.member else member
            layer_problems.append(Problem(nested, problem.kind, problem.detail))
    found += _capped(layer_problems, "moe_layers", "layer problems")
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
