"""The resolution trace: what the walk from the served object to the MoE model saw.

Errors are values until the boundary: resolution records every candidate it
checked (with its conformance report) and every unwrapping step it tried, and
``MoEView.require`` turns a failed trace into an exception whose message is
this trace, printed.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

from moe_protocols.conformance import ConformanceReport

__all__ = ["ResolutionTrace", "TraceEntry", "TraceOutcome"]

ROOT_PATH: Final = "model"
"""How trace paths name the served object: ``"model.get_language_model()"``."""


class TraceOutcome(enum.Enum):
    """What happened at one point of the walk."""

    CANDIDATE_REJECTED = "rejected"
    """An object was checked and does not satisfy ``MixtureOfExperts`` with MoE layers."""
    RESOLVED = "resolved"
    """An object was checked and satisfies it: the walk ends here."""
    FORWARDS = "forwards"
    """An object satisfies it only through ``__getattr__`` forwarding (none of the
    counts is its own attribute, as with PEFT's ``PeftModel``): the walk looks
    further for the object it forwards to, and comes back to it if none is found."""
    NOT_APPLICABLE = "not applicable"
    """A step does not apply to the object (the attribute or method is absent)."""
    RAISED = "raised"
    """A step's probe raised; the walk goes on with the other steps."""
    ALREADY_VISITED = "already visited"
    """A step led to an object seen before (a shared child, a self-reference, a cycle)."""
    DEPTH_LIMIT = "depth limit"
    """A rejected object at ``max_depth`` was not unwrapped further."""
    BUDGET_EXHAUSTED = "budget exhausted"
    """The candidate budget ran out; no further objects were probed."""
    NOT_CHECKED = "not checked"
    """An object a step had found was still waiting to be checked when the walk
    resolved (the walk ends at the first MoE model): listed so that the trace
    shows every object the steps reached."""


_CANDIDATE_OUTCOMES: Final = frozenset(
    {TraceOutcome.CANDIDATE_REJECTED, TraceOutcome.RESOLVED, TraceOutcome.FORWARDS}
)


@attrs.frozen
class TraceEntry:
    """One event of the walk.

    For a candidate (``CANDIDATE_REJECTED``/``RESOLVED``), ``path`` is where the
    object sits, ``step`` the step that led to it (``""`` for the served object)
    and ``report`` its conformance report. For a step outcome, ``path`` is
    where the step would have led and ``depth`` that object's depth.
    """

    depth: int = attrs.field(validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)])
    path: str = attrs.field(validator=attrs.validators.instance_of(str))
    step: str = attrs.field(validator=attrs.validators.instance_of(str))
    outcome: TraceOutcome = attrs.field(validator=attrs.validators.instance_of(TraceOutcome))
    detail: str = attrs.field(validator=attrs.validators.instance_of(str))
    report: ConformanceReport | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.instance_of(ConformanceReport)),
    )

    @property
    def is_candidate(self) -> bool:
        """True when this entry is an object that was checked against the protocol."""
        return self.outcome in _CANDIDATE_OUTCOMES


def _candidate_prefix(depth: int) -> str:
    return "  " * depth + ("-> " if depth else "")


@attrs.frozen
class ResolutionTrace:
    """Every candidate checked and every step tried, in the order the walk did them.

    ``str(trace)`` prints the walk, one candidate per line followed by what its
    unwrapping steps gave::

        model (KimiK25ForConditionalGeneration): not MixtureOfExperts: missing ...
           .language_model: already visited (same object as model.get_language_model())
           not applicable: ._orig_mod, .module, get_base_model(), .thinker
          -> model.get_language_model() (DeepseekV2ForCausalLM): MixtureOfExperts (3 MoE layers)
    """

    entries: tuple[TraceEntry, ...] = attrs.field(
        validator=attrs.validators.deep_iterable(
            member_validator=attrs.validators.instance_of(TraceEntry),
            iterable_validator=attrs.validators.instance_of(tuple),
        )
    )
    steps: tuple[str, ...] = attrs.field(
        default=(),
        validator=attrs.validators.deep_iterable(
            member_validator=attrs.validators.instance_of(str),
            iterable_validator=attrs.validators.instance_of(tuple),
        ),
    )
    """Names of the unwrapping steps the walk tried, in order."""

    @property
    def resolved_path(self) -> str | None:
        """Where the MoE model was found (``"model.get_language_model()"``), or None."""
        for entry in self.entries:
            if entry.outcome is TraceOutcome.RESOLVED:
                return entry.path
        return None

    @property
    def reports(self) -> tuple[ConformanceReport, ...]:
        """The conformance report of every candidate checked, in walk order."""
        return tuple(e.report for e in self.entries if e.is_candidate and e.report is not None)

    @property
    def candidates(self) -> tuple[TraceEntry, ...]:
        """The entries for objects that were checked, in walk order."""
        return tuple(e for e in self.entries if e.is_candidate)

    def __str__(self) -> str:
        lines: list[str] = []
        not_applicable: list[str] = []
        step_prefix = ""

        not_checked = [e.detail for e in self.entries if e.outcome is TraceOutcome.NOT_CHECKED]

        def flush() -> None:
            if not_applicable:
                lines.append(f"{step_prefix}not applicable: {', '.join(not_applicable)}")
                not_applicable.clear()

        for entry in self.entries:
            if entry.is_candidate:
                flush()
                prefix = _candidate_prefix(entry.depth)
                subject = entry.report.subject if entry.report is not None else "?"
                lines.append(f"{prefix}{entry.path} ({subject}): {entry.detail}")
                # A candidate's step outcomes are indented under its path.
                step_prefix = " " * (len(prefix) + 2)
            elif entry.outcome is TraceOutcome.NOT_APPLICABLE:
                not_applicable.append(entry.step)
            elif entry.outcome is TraceOutcome.NOT_CHECKED:
                continue  # one summary line at the end
            elif entry.outcome is TraceOutcome.RAISED:
                lines.append(f"{step_prefix}{entry.step}: raised {entry.detail}")
            elif entry.outcome is TraceOutcome.ALREADY_VISITED:
                lines.append(f"{step_prefix}{entry.step}: already visited ({entry.detail})")
            else:
                lines.append(f"{step_prefix}{entry.outcome.value}: {entry.detail}")
        flush()
        if not_checked:
            lines.append(
                "also reached, not checked (the walk ends at the first MoE model): "
                + ", ".join(not_checked)
            )
        return "\n".join(lines)
