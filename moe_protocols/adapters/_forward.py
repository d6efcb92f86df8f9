"""Members declared as attributes, backed by descriptors: ``forwarded`` and ``fixed``.

Why not a property in the class body: pyright never accepts a property as the implementation of
a protocol attribute declared ``x: T`` (vLLM declares every
``MixtureOfExperts`` member that way), and mypy accepts one only with a
setter. A class that forwards a member therefore declares it as what it is to
its users, an attribute, and puts one of these behind the declaration::

    num_moe_layers: int = forwarded("_model")

Type checkers see ``num_moe_layers: int``; at run time the placeholder turns
itself into a property when the class is created, and reads and writes go to
``self._model.num_moe_layers``. The declared type is the checked part: the
forwarding classes' tests compare each declaration with the protocol's.
``fixed`` is the same idea for a count that an adapter computes once and
cannot change (it may be "set" to its own value, as a host that rewrites all
counts does).
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any, Final, final

from moe_protocols.errors import EplbStateError

__all__ = ["fixed", "forwarded"]


class _Declared:
    """Stands in the class body until ``__set_name__``, which replaces it by a ``property``.

    A property whose getter is an ``operator.attrgetter`` reads in C, as fast
    as a hand-written property or faster; the declaration it replaces is what
    type checkers see.
    """

    def __init__(self, doc: str | None) -> None:
        self._doc = doc

    def __set_name__(self, owner: type[object], name: str) -> None:
        getter, setter = self._accessors(name)
        setattr(owner, name, property(getter, setter, doc=self._doc))

    def _accessors(
        self, name: str
    ) -> tuple[Callable[[object], object], Callable[[object, object], None]]:
        raise NotImplementedError


@final
class _Forwarded(_Declared):
    """``obj.<name>`` is ``getattr(obj, target).<name>``, both ways."""

    def __init__(self, target: str, doc: str | None) -> None:
        super().__init__(doc)
        self._target: Final = target

    def _accessors(
        self, name: str
    ) -> tuple[Callable[[object], object], Callable[[object, object], None]]:
        target = self._target

        def write(obj: object, value: object) -> None:
            setattr(getattr(obj, target), name, value)

        return attrgetter(f"{target}.{name}"), write


def forwarded(target: str, doc: str | None = None) -> Any:
    """A member forwarded to the member of the same name on ``getattr(self, target)``.

    Returns ``Any`` on purpose, so that the annotation on the class
    (``num_moe_layers: int = forwarded("_model")``) is what type checkers see:
    a plain attribute of that type.
    """
    return _Forwarded(target, doc)


@final
class _Fixed(_Declared):
    """``obj.<name>`` is ``getattr(obj, source)``; setting another value raises."""

    def __init__(self, source: str, why: str, doc: str | None) -> None:
        super().__init__(doc)
        self._source: Final = source
        self._why: Final = why

    def _accessors(
        self, name: str
    ) -> tuple[Callable[[object], object], Callable[[object, object], None]]:
        source, why = self._source, self._why

        def write(obj: object, value: object) -> None:
            current = getattr(obj, source)
            if value != current:
                raise EplbStateError(
                    f"{obj!r}: cannot set {name}={value!r}: {why} ({name}={current!r})"
                )

        return attrgetter(source), write


def fixed(source: str, why: str, doc: str | None = None) -> Any:
    """A member that reads ``getattr(self, source)`` and refuses any other value (``why`` says why).

    Raises ``EplbStateError`` on a write of a different value; writing the
    same value is accepted. Typed ``Any`` for the reason ``forwarded`` is.
    """
    return _Fixed(source, why, doc)
