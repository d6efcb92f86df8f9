"""``UnwrapStep``: one named, structural way to go one level down, and the kinds of step.

Kept apart from the walk so that ecosystem adapters (``adapters/hf``) can
define steps without importing the walk; ``_defaults.py`` puts the generic
and the ecosystem steps together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import attrs

from moe_protocols.errors import ResolutionConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["STEP_KINDS", "StepKind", "UnwrapStep", "attribute_probe", "method_probe", "step_kind"]

StepKind: TypeAlias = Literal["unwrap", "descend", "adapt"]
"""How the walk treats what a step returns.

* ``"unwrap"``: the object is a wrapper around what the step returns
  (torch.compile, DDP, PEFT, a VLM around its language model). An ``"adapt"``
  step is never applied to a wrapper whose inner object it would also adapt:
  the adapter is built below the wrapper.
* ``"descend"``: the step returns a part of the object (transformers'
  ``get_decoder()``: a causal LM's decoder without its head). The part is
  checked like any candidate, but the object itself stays the one to adapt.
* ``"adapt"``: the step presents the object as ``MixtureOfExperts`` (an
  ecosystem adapter such as the hf-experts adapter).
"""

STEP_KINDS: Final[tuple[StepKind, ...]] = ("unwrap", "descend", "adapt")
"""Every ``StepKind``, in the order of its documentation."""


# The validators take Any: they exist for values the annotations do not hold.
def _text(instance: object, attribute: attrs.Attribute[str], value: Any) -> None:
    if not isinstance(value, str):
        raise ResolutionConfigError(
            f"UnwrapStep.{attribute.name} must be a str, got {type(value).__name__}"
        )
    if attribute.name == "name" and not value.strip():
        raise ResolutionConfigError(f"UnwrapStep.{attribute.name} must not be empty")


def _callable(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not callable(value):
        raise ResolutionConfigError(
            f"UnwrapStep.{attribute.name} must be callable, got {type(value).__name__}"
        )


def _kind(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value not in STEP_KINDS:
        raise ResolutionConfigError(
            f"UnwrapStep.{attribute.name} must be one of {', '.join(map(repr, STEP_KINDS))}, "
            f"got {value!r}"
        )


@attrs.frozen
class UnwrapStep:
    """One named way to go one level down from an object: unwrap it, descend into it, or adapt it.

    ``probe(obj)`` returns the inner object, or None when the step does not
    apply to ``obj``. It may raise: the walk records the exception in the
    trace and goes on with the other steps. ``name`` is how the step shows in
    trace paths: a name starting with ``.`` or ``[`` is appended as is
    (``model._orig_mod``), an attribute-like name after a dot
    (``model.get_language_model()``), anything else after an arrow.
    """

    name: str = attrs.field(validator=_text)
    probe: Callable[[object], object | None] = attrs.field(validator=_callable)
    description: str = attrs.field(default="", validator=_text)
    kind: StepKind = attrs.field(default="unwrap", validator=_kind)
    """How the walk treats what ``probe`` returns (see ``StepKind``)."""


def step_kind(step: object) -> StepKind:
    """The kind of ``step``; ``"unwrap"`` for a duck-typed step without a valid ``kind``."""
    try:
        kind: object = getattr(step, "kind", "unwrap")
        for known in STEP_KINDS:
            if kind == known:
                return known
    except Exception:
        pass  # a step too odd to read is taken as a plain unwrapping step
    return "unwrap"


def method_probe(name: str) -> Callable[[object], object | None]:
    """A probe calling ``obj.name()`` when it is callable; its exceptions propagate."""

    def probe(obj: object) -> object | None:
        method = getattr(obj, name, None)
        if not callable(method):
            return None
        result: object | None = method()
        return result

    probe.__name__ = probe.__qualname__ = f"call_{name}"
    return probe


def attribute_probe(*names: str) -> Callable[[object], object | None]:
    """A probe following ``obj.a.b...``; None as soon as one attribute is absent."""

    def probe(obj: object) -> object | None:
        current: object | None = obj
        for name in names:
            current = getattr(current, name, None)
            if current is None:
                return None
        return current

    probe.__name__ = probe.__qualname__ = "attribute_" + "_".join(names)
    return probe
