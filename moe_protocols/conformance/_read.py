"""Reading members of any object without raising, and describing values and exceptions.

The checked object may be a mock, a class, ``None`` or an object whose
properties raise: every read here turns a failure into a ``Problem`` (or a
fallback text) instead of an exception.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable
from typing import Final, TypeVar

import torch

from moe_protocols.conformance._report import Problem, ProblemKind, truncate

__all__ = [
    "MISSING",
    "Missing",
    "defined_statically",
    "describe",
    "describe_exception",
    "guarded",
    "is_class",
    "is_text",
    "item",
    "read",
    "subject",
    "type_name",
]

_T = TypeVar("_T")


class Missing(enum.Enum):
    """Marks a member that could not be read (missing, or reading it raised)."""

    TOKEN = 0


MISSING: Final = Missing.TOKEN


def type_name(value: object) -> str:
    """The qualified name of ``value``'s type, for messages."""
    # type() cannot be fooled by a __class__ property, unlike value.__class__.
    try:
        return type(value).__qualname__
    except Exception:
        return "<unknown type>"


def describe(value: object) -> str:
    """``"float 1.5"``, ``"Tensor of shape [4, 8] (torch.float32)"``: a value for a message."""
    try:
        if isinstance(value, torch.Tensor):
            return f"Tensor of shape {list(value.shape)} ({value.dtype})"
        return f"{type_name(value)} {truncate(repr(value))}"
    except Exception as exc:
        return f"{type_name(value)} (repr raised {describe_exception(exc)})"


def describe_exception(exc: BaseException) -> str:
    """``"ZeroDivisionError: boom"``: an exception for a message, even one whose str() raises."""
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable message>"
    name = type_name(exc)
    return f"{name}: {truncate(message, 160)}" if message else name


def is_class(value: object) -> bool:
    """Whether ``value`` is a class (given where an instance belongs)."""
    # Decided from type(), which a hostile __class__ cannot change.
    return issubclass(type(value), type)


def is_text(value: object) -> bool:
    """Whether ``value`` is a string of some kind (a sequence, but never one of layers)."""
    return isinstance(value, (str, bytes, bytearray))


def defined_statically(obj: object, name: str) -> bool:
    """Whether ``name`` exists without running code (a property, a slot, an instance attribute)."""
    try:
        inspect.getattr_static(obj, name)
    except Exception:
        return False
    return True


def read(obj: object, name: str, problems: list[Problem]) -> object:
    """Read ``obj.name``; on failure append MISSING or RAISED and return ``MISSING``."""
    try:
        return getattr(obj, name)
    except AttributeError as exc:
        if defined_statically(obj, name):
            # A property that exists but raised AttributeError is a fault of
            # the property, not a missing member: say what it raised.
            problems.append(
                Problem(name, ProblemKind.RAISED, f"reading it raised {describe_exception(exc)}")
            )
        else:
            problems.append(Problem(name, ProblemKind.MISSING, "missing"))
    except Exception as exc:
        problems.append(
            Problem(name, ProblemKind.RAISED, f"reading it raised {describe_exception(exc)}")
        )
    return MISSING


def item(sequence: object, index: int, member: str, problems: list[Problem]) -> object:
    """``sequence[index]``, or ``MISSING`` after a RAISED problem on ``member`` when it raises."""
    try:
        return sequence[index]  # type: ignore[index]  # checked to be a sequence by the caller
    except Exception as exc:
        problems.append(
            Problem(member, ProblemKind.RAISED, f"indexing raised {describe_exception(exc)}")
        )
        return MISSING


def guarded(member: str, problems: list[Problem], check: Callable[[], _T]) -> _T | None:
    """Run one check; an exception inside it becomes a RAISED problem on ``member``."""
    try:
        return check()
    except Exception as exc:
        problems.append(
            Problem(member, ProblemKind.RAISED, f"checking it raised {describe_exception(exc)}")
        )
        return None


def subject(obj: object) -> str:
    """The class name shown in reports: the object's class, or the class itself if given one."""
    if is_class(obj):
        try:
            name = getattr(obj, "__qualname__", None)
        except Exception:
            name = None
        return name if isinstance(name, str) else type_name(obj)
    return type_name(obj)
