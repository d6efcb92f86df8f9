"""The bounds of one check: how many items it reads, how many problems it lists, how long it runs.

A conformance check must end for any input, however long (or endless, or
slow) its sequences are: these limits turn such inputs into problems.
"""

from __future__ import annotations

import time
from typing import Final

import attrs

from moe_protocols.conformance._report import Problem, ProblemKind

__all__ = [
    "MAX_LAYERS_CHECKED",
    "MAX_WEIGHTS_CHECKED",
    "Budget",
    "capped",
    "over_budget",
]

# Element-level problems (one per layer or tensor) are listed up to this many
# per collection, then counted in one summary problem: a 60-layer model with
# the same fault everywhere should not bury the other findings.
_MAX_ITEM_PROBLEMS: Final = 12
# Layers beyond this index are not checked: no real model has that many MoE
# layers, and a hostile ``__len__`` must not make the check run for ever.
MAX_LAYERS_CHECKED: Final = 4096
# Weight tensors checked per layer of ``expert_weights`` (real layers have 2 or 3).
MAX_WEIGHTS_CHECKED: Final = 256
# Wall-clock budget of one check: sequences whose items are slow to produce
# (or that never end) turn into a problem instead of a hang. Read when a
# check starts (not bound at import), so that a test may lower it.
_TIME_BUDGET_S: Final = 5.0


@attrs.define
class Budget:
    """The time one ``check_conformance`` call may take; ``spent()`` once it is over."""

    deadline: float = attrs.field(factory=lambda: time.monotonic() + _TIME_BUDGET_S)

    def spent(self) -> bool:
        """Whether the deadline has passed."""
        return time.monotonic() > self.deadline


def over_budget(member: str) -> Problem:
    """The problem that ends a check of ``member`` which ran out of time."""
    return Problem(
        member,
        ProblemKind.INVALID_VALUE,
        f"checking it took longer than {_TIME_BUDGET_S:g} s (items that are slow to produce, "
        "or a sequence that never ends); the rest was not checked",
    )


def capped(problems: list[Problem], member: str, what: str) -> list[Problem]:
    """At most ``_MAX_ITEM_PROBLEMS`` element problems, plus one that counts the rest."""
    if len(problems) <= _MAX_ITEM_PROBLEMS:
        return problems
    rest = len(problems) - _MAX_ITEM_PROBLEMS
    kinds = sorted({p.kind.value for p in problems[_MAX_ITEM_PROBLEMS:]})
    summary = Problem(member, problems[-1].kind, f"{rest} more {what} ({', '.join(kinds)})")
    return [*problems[:_MAX_ITEM_PROBLEMS], summary]
