"""Checks of plain values (counts, fractions, finite numbers), written once.

Every check raises the typed error its caller names (never a bare
``ValueError``/``TypeError``), with the caller's own wording: the message is a
template filled with ``label`` (what is checked, e.g. ``"EplbConfig.window_size"``),
``value`` (what was given), ``type`` (its type name) and ``minimum``. ``bool``
is never accepted as an ``int``: it is a subclass, and a flag passed where a
count belongs is a bug.

Two shapes: ``require_*`` functions for arguments (they return the value,
narrowed), and ``*_field`` factories for ``attrs`` validators (the label is
``Owner.field``, the owner the instance's class unless given).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final, TypeGuard

import attrs

from moe_protocols.errors import MoEProtocolsError

__all__ = [
    "AT_LEAST",
    "FINITE_AT_LEAST_ZERO",
    "IN_UNIT_INTERVAL",
    "NUMBER_AT_LEAST_ZERO",
    "Validator",
    "int_field",
    "is_int",
    "is_real",
    "number_field",
    "require_int",
    "require_number",
]

AT_LEAST: Final = "{label} must be an int >= {minimum}, got {value!r}"
"""The common wording of a failed count check."""

FINITE_AT_LEAST_ZERO: Final = "{label} must be a finite number >= 0, got {value!r}"
NUMBER_AT_LEAST_ZERO: Final = "{label} must be a number >= 0, got {value!r}"
IN_UNIT_INTERVAL: Final = "{label} must be a number in [0, 1], got {value!r}"

# ``Any`` because ``attrs.Attribute`` is invariant in the field's type: one
# validator serves ``int``, ``int | None`` and ``float`` fields alike.
Validator = Callable[[object, "attrs.Attribute[Any]", Any], None]


def is_int(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is an ``int`` or ``float`` and not a ``bool`` (NaN included)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(
    error: type[MoEProtocolsError], template: str, label: str, value: object, minimum: object
) -> MoEProtocolsError:
    return error(
        template.format(label=label, value=value, type=type(value).__name__, minimum=minimum)
    )


def require_int(
    value: object,
    *,
    minimum: int,
    error: type[MoEProtocolsError],
    label: str,
    template: str = AT_LEAST,
    type_template: str | None = None,
) -> int:
    """``value`` if it is an ``int`` (not ``bool``) ``>= minimum``, else ``error``.

    ``type_template``, when given, words the not-an-int case separately
    (``template`` then words only the too-small case).
    """
    if not is_int(value):
        raise _fail(error, type_template or template, label, value, minimum)
    if value < minimum:
        raise _fail(error, template, label, value, minimum)
    return value


def require_number(
    value: object,
    *,
    error: type[MoEProtocolsError],
    label: str,
    minimum: float = 0.0,
    maximum: float = math.inf,
    finite: bool = False,
    template: str = NUMBER_AT_LEAST_ZERO,
) -> float:
    """``value`` if it is a real number in ``[minimum, maximum]``, else ``error``.

    With ``finite``, infinities are refused too.

    NaN is always refused (it compares false with every bound).
    """
    if (
        not is_real(value)
        or not minimum <= value <= maximum
        or (finite and not math.isfinite(value))
    ):
        raise _fail(error, template, label, value, minimum)
    return value


def _label(owner: str | None, instance: object, attribute: attrs.Attribute[Any]) -> str:
    return f"{owner or type(instance).__name__}.{attribute.name}"


def int_field(
    minimum: int,
    error: type[MoEProtocolsError],
    *,
    owner: str | None = None,
    template: str = AT_LEAST,
    type_template: str | None = None,
    optional: bool = False,
) -> Validator:
    """An ``attrs`` validator: the field is an ``int`` ``>= minimum``.

    With ``optional``, ``None`` passes too.
    """

    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if optional and value is None:
            return
        require_int(
            value,
            minimum=minimum,
            error=error,
            label=_label(owner, instance, attribute),
            template=template,
            type_template=type_template,
        )

    return check


def number_field(
    error: type[MoEProtocolsError],
    *,
    owner: str | None = None,
    minimum: float = 0.0,
    maximum: float = math.inf,
    finite: bool = False,
    template: str = NUMBER_AT_LEAST_ZERO,
) -> Validator:
    """An ``attrs`` validator: the field is a real number in ``[minimum, maximum]``."""

    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        require_number(
            value,
            error=error,
            label=_label(owner, instance, attribute),
            minimum=minimum,
            maximum=maximum,
            finite=finite,
            template=template,
        )

    return check
