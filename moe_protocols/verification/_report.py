"""What a verification run reports: one check's outcome, and the report of the whole run."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    pass


class CheckStatus(enum.Enum):
    """Outcome of one check."""

    PASSED = "PASS"
    FAILED = "FAIL"
    SKIPPED = "SKIP"


@attrs.frozen
class VerificationCheck:
    """One check's result; a failure names the layer, what was seen and what to fix."""

    name: str
    """Stable identifier, e.g. ``"load-counts"`` or ``"move-permute:maps"``."""
    status: CheckStatus
    observed: str
    """What was seen (for a skip: why the check could not run)."""
    layer: int | None = None
    """Index of the MoE layer at fault (``moe_layers[layer]``), when one is."""
    layer_path: str | None = None
    """Module path of that layer below the served object, where it can be found."""
    fix: str | None = None
    """What to change in the model (failures only)."""

    @property
    def where(self) -> str | None:
        """``"MoE layer 1 (model.layers.2.ffn)"``, or None for a model-wide result."""
        if self.layer is None:
            return None
        return f"MoE layer {self.layer}" + (f" ({self.layer_path})" if self.layer_path else "")

    def __str__(self) -> str:
        where = self.where
        text = f"{self.status.value}  {self.name}: " + (f"{where}: " if where else "")
        text += self.observed
        if self.fix:
            text += f"\n        fix: {self.fix}"
        return text


def _tuple_of_checks(checks: Sequence[VerificationCheck]) -> tuple[VerificationCheck, ...]:
    return tuple(checks)


@attrs.frozen
class VerificationReport:
    """Everything :func:`verify_eplb_integration` checked, in order; ``ok`` when none failed."""

    model: str
    """Class name of the served object."""
    checks: tuple[VerificationCheck, ...] = attrs.field(converter=_tuple_of_checks)
    resolved: str | None = None
    """Where the MoE model was found and its counts; None when none was found."""
    inputs: str | None = None
    """What the forwards were fed."""
    tolerance: str | None = None
    """How outputs were compared (bit-exact, or the allclose tolerances)."""

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped checks do not count against it)."""
        return not self.failures

    @property
    def failures(self) -> tuple[VerificationCheck, ...]:
        """The failed checks."""
        return tuple(c for c in self.checks if c.status is CheckStatus.FAILED)

    @property
    def skipped(self) -> tuple[VerificationCheck, ...]:
        """The checks that could not run, each saying why."""
        return tuple(c for c in self.checks if c.status is CheckStatus.SKIPPED)

    def named(self, name: str) -> tuple[VerificationCheck, ...]:
        """The results of one check (several when it failed on several layers)."""
        return tuple(c for c in self.checks if c.name == name)

    def __str__(self) -> str:
        lines = [f"EPLB integration check of {self.model}"]
        for label, value in (
            ("MoE model", self.resolved),
            ("inputs", self.inputs),
            ("outputs compared", self.tolerance),
        ):
            if value is not None:
                lines.append(f"  {label}: {value}")
        lines.append("")
        lines += [f"  {check}" for check in self.checks]
        lines += ["", self.summary]
        return "\n".join(lines)

    @property
    def summary(self) -> str:
        """The verdict in one line: ``"OK: every check holds (2 skipped)"`` or ``"FAILED: ..."``."""
        failed, skipped = len(self.failures), len(self.skipped)
        tail = f" ({skipped} skipped)" if skipped else ""
        if failed:
            return f"FAILED: {failed} of {len(self.checks)} checks failed{tail}"
        return f"OK: every check holds{tail}"
