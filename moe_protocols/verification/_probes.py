"""Reading the model under test: its layers' paths and top-k, and a count of routed tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, cast, final

import torch
from torch import Tensor

from moe_protocols.adapters._view import MoEView
from moe_protocols.adapters.hf._probe import TOP_K_ATTRS as _TOP_K_ATTRS
from moe_protocols.adapters.hf._probe import int_attr as _int_attr
from moe_protocols.adapters.hf._probe import text_config as _text_config
from moe_protocols.protocols import MixtureOfExperts

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle


def layer_paths(root: object, view: MoEView) -> list[str | None]:
    """Module path of every MoE layer below the served object, where it can be found."""
    names: dict[int, str] = {}
    named_modules = getattr(root, "named_modules", None)
    if callable(named_modules):
        try:
            modules = cast("Iterable[tuple[str, object]]", named_modules())
            names = {id(module): name for name, module in modules}
        except Exception:
            names = {}
    paths: list[str | None] = []
    for layer in view.moe_layers:
        path = names.get(id(layer), getattr(layer, "path", None))
        paths.append(path if isinstance(path, str) and path else None)
    return paths


def top_k_of(layer: object, model: object) -> int | None:
    """Experts each token is sent to, read from the layer, the model or its (text) config."""
    config = getattr(model, "config", None)
    for source in (layer, model, _text_config(model), config):
        if source is not None and (found := _int_attr(source, _TOP_K_ATTRS)) is not None:
            return found
    return None


def protocol_default(model: object, method: str) -> bool:
    """Whether ``model`` inherits the protocol's do-nothing body of ``method``."""
    return getattr(type(model), method, None) is getattr(MixtureOfExperts, method)


@final
class TokenCounter:
    """Counts the tokens each MoE layer is called with (layers that are modules only)."""

    def __init__(self, layers: Sequence[object]) -> None:
        self.tokens: list[int | None] = [None] * len(layers)
        self._handles: list[RemovableHandle] = []
        for i, layer in enumerate(layers):
            register = getattr(layer, "register_forward_pre_hook", None)
            if callable(register):
                self.tokens[i] = 0
                handle = register(self._hook(i), with_kwargs=True)
                self._handles.append(cast("RemovableHandle", handle))

    def _hook(self, index: int) -> Callable[[object, tuple[object, ...], dict[str, object]], None]:
        def count_tokens(_: object, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            for value in (*args, *kwargs.values()):
                if isinstance(value, Tensor) and value.dim() >= 1:
                    width = value.shape[-1] if value.dim() >= 2 else 1
                    self.tokens[index] = (self.tokens[index] or 0) + value.numel() // width
                    return

        return count_tokens

    def reset(self) -> None:
        self.tokens = [None if t is None else 0 for t in self.tokens]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def logical_load(load: Tensor, physical_to_logical: Tensor, num_logical: int) -> Tensor:
    """``[L, E]`` int64: a ``[L, P]`` load summed onto the logical experts of a placement."""
    out = torch.zeros(load.shape[0], num_logical, dtype=torch.int64)
    out.scatter_add_(1, physical_to_logical.cpu(), load.cpu().to(torch.int64))
    return out
