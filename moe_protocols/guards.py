"""Type guards for the contract: narrow ``object`` to a protocol without a cast.

Each guard returns ``TypeGuard[...]``, so ``if is_mixture_of_experts(model):``
lets a type checker treat ``model`` as a ``MixtureOfExperts`` in the branch.
They narrow the positive branch only, on purpose: each is False for some
objects that *are* of the protocol type (a model with ``num_moe_layers == 0``
or whose counts break an invariant; a method whose parameters are renamed,
which mypy accepts; a class object), so a ``TypeIs`` would tell the checker
something false in the ``else`` branch. The guards decide structurally (they
never ask for a concrete class) and never raise, whatever they are given: a
mock, a class, ``None``, an object whose properties raise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeGuard

from moe_protocols.conformance import check_conformance, check_layer_conformance

if TYPE_CHECKING:
    from moe_protocols.protocols import MixtureOfExperts, MoELayer, SupportsLanguageModel

__all__ = ["is_mixture_of_experts", "is_moe_layer", "supports_language_model"]


def is_mixture_of_experts(x: object) -> TypeGuard[MixtureOfExperts]:
    """Whether ``x`` conforms to ``MixtureOfExperts`` and has at least one MoE layer.

    Stricter than vLLM's guard, which trusts a nominal subclass of the
    protocol: here every member is present and well typed, the methods accept
    a runner's keyword arguments and the count invariants hold (see
    ``check_conformance`` for the reasons when this is False). A dense model
    (``num_moe_layers == 0``) is not MoE. False says "not an active, valid MoE
    model", not "not of the protocol type", so only the True branch narrows.
    """
    try:
        return check_conformance(x).is_moe
    except Exception:  # check_conformance never raises; this keeps the promise if it ever did
        return False


def is_moe_layer(x: object) -> TypeGuard[MoELayer]:
    """Whether ``x`` conforms to ``MoELayer`` (both methods callable with a runner's arguments)."""
    try:
        return check_layer_conformance(x, path="layer").ok
    except Exception:
        return False


def supports_language_model(x: object) -> TypeGuard[SupportsLanguageModel]:
    """Whether ``x`` is an instance with a callable ``get_language_model`` (a multimodal wrapper).

    The method may still raise ``NotImplementedError`` when called, as vLLM's
    default implementation does when no language model was marked.
    """
    try:
        if issubclass(type(x), type):
            return False  # a class has the method unbound; it is not a wrapper instance
        return callable(getattr(x, "get_language_model", None))
    except Exception:
        return False
