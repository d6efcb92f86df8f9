"""``UnwrapStep``: one named, structural way to go one wrapper level down.

Kept apart from the walk so that adapter modules can define steps that the
default step list then includes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["UnwrapStep", "attribute_probe", "method_probe"]


def _non_empty(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value.strip():
        raise ValueError(f"UnwrapStep.{attribute.name} must not be empty")


@attrs.frozen
class UnwrapStep:
    """One named way to go one wrapper level down.

    ``probe(obj)`` returns the inner object, or None when the step does not
    apply to ``obj``. It may raise: the walk records the exception in the
    trace and goes on with the other steps. ``name`` is how the step shows in
    trace paths: a name starting with ``.`` or ``[`` is appended as is
    (``model._orig_mod``), an attribute-like name after a dot
    (``model.get_language_model()``), anything else after an arrow.
    """

    name: str = attrs.field(validator=[attrs.validators.instance_of(str), _non_empty])
    probe: Callable[[object], object | None] = attrs.field(validator=attrs.validators.is_callable())
    description: str = attrs.field(default="", validator=attrs.validators.instance_of(str))


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
