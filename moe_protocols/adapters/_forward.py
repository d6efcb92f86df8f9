"""``forwarded``: one explicitly declared member that reads and writes the same member of a target.

Why not a property: pyright never accepts a property as the implementation of
a protocol attribute declared ``x: T`` (vLLM declares every
``MixtureOfExperts`` member that way), and mypy accepts one only with a
setter. A class that forwards a member therefore declares it as what it is to
its users, an attribute, and puts this descriptor behind the declaration::

    num_moe_layers: int = forwarded("_model")

Type checkers see ``num_moe_layers: int``; at run time reads and writes go to
``self._model.num_moe_layers``. The declared type is the checked part: the
forwarding classes' tests compare each declaration with the protocol's.
"""

from __future__ import annotations

from typing import Any, Final, final

__all__ = ["forwarded"]


@final
class _Forwarded:
    """Data descriptor: ``obj.<name>`` is ``getattr(obj, target).<name>``, both ways."""

    def __init__(self, target: str, doc: str | None) -> None:
        self._target: Final = target
        self._name = ""
        self.__doc__ = doc

    def __set_name__(self, owner: type[object], name: str) -> None:
        self._name = name

    def __get__(self, obj: object | None, owner: type[object] | None = None) -> object:
        if obj is None:
            return self  # on the class: the descriptor itself (help(), introspection)
        return getattr(getattr(obj, self._target), self._name)

    def __set__(self, obj: object, value: object) -> None:
        setattr(getattr(obj, self._target), self._name, value)

    def __repr__(self) -> str:
        return f"<forwarded to .{self._target}.{self._name}>"


def forwarded(target: str, doc: str | None = None) -> Any:
    """A member forwarded to the member of the same name on ``getattr(self, target)``.

    Returns ``Any`` on purpose, so that the annotation on the class
    (``num_moe_layers: int = forwarded("_model")``) is what type checkers see:
    a plain attribute of that type.
    """
    return _Forwarded(target, doc)
