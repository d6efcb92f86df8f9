"""Structural probes of torch modules and configs: attributes, flags, signatures, never classes.

Everything the hf-experts adapter learns about a transformers model it learns
through these reads, so the adapter never imports transformers and never asks
which class a module is.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from torch import Tensor

if TYPE_CHECKING:
    from torch import nn
    from typing_extensions import TypeIs

__all__ = [
    "TOP_K_ATTRS",
    "flag",
    "int_attr",
    "is_module",
    "positional_arity",
    "tensor_attr",
    "text_config",
]

TOP_K_ATTRS: Final = ("top_k", "num_experts_per_tok", "top_k_experts", "moe_topk", "moe_k")
"""Names a router, a block or a (text) config uses for the experts chosen per token."""


def is_module(obj: object) -> TypeIs[nn.Module]:
    """Whether ``obj`` behaves like a ``torch.nn.Module`` (attribute probes, no class check).

    The methods are looked up on the type, so a mock that answers every
    attribute with another mock is not taken for a module.
    """
    cls = type(obj)
    return all(
        callable(getattr(cls, name, None))
        for name in ("named_modules", "named_parameters", "register_forward_pre_hook")
    )


def tensor_attr(module: object, name: str) -> Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, Tensor) else None


def int_attr(obj: object, names: Iterable[str]) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def text_config(obj: object) -> object | None:
    """``obj.config``, narrowed to its text sub-config when it has one (VLM configs)."""
    config: object | None = getattr(obj, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            text: object | None = get_text_config()
        except Exception:
            # Per-layer configs may refuse global reads; fall back to the config itself.
            return config
        return text
    return config


def positional_arity(function: object) -> int | None:
    """Positional parameters ``function`` accepts; ``None`` when unbounded or unknown."""
    if not callable(function):
        return None
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    count = 0
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        if parameter.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            count += 1
    return count


def flag(module: object, name: str) -> bool | None:
    value = getattr(module, name, None)
    return value if isinstance(value, bool) else None
