"""The value types a conformance check returns: a report and the problems it lists."""

from __future__ import annotations

import enum
from typing import Final

import attrs

from moe_protocols.protocols import MODEL_MEMBERS

__all__ = [
    "MIXTURE_OF_EXPERTS",
    "MOE_LAYER",
    "ConformanceReport",
    "Problem",
    "ProblemKind",
    "truncate",
]

MIXTURE_OF_EXPERTS: Final = "MixtureOfExperts"
MOE_LAYER: Final = "MoELayer"

_REPR_LIMIT: Final = 80


def truncate(text: str, limit: int = _REPR_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, ending in ``...`` when cut: long values in messages."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        return truncate(str(self), 100)

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
