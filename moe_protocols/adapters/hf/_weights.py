"""Expert weight layout: how an experts module stores its weights, and views in ``nn.Linear`` order.

``HFExpertWeights`` holds views (never copies) of the live parameters, in
the order gate, up, down, then the biases; ``read_layout`` reads the storage
layout from the decorator's flags or infers it from shapes, and
``weight_views`` builds the views (``.transpose`` for transposed storage,
stride 2 for interleaved gate/up).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from torch import Tensor

from moe_protocols.adapters.hf._probe import flag, tensor_attr

if TYPE_CHECKING:
    from torch import nn

__all__ = ["HFExpertWeights", "Layout", "read_layout", "weight_views"]


@attrs.frozen(eq=False)
class HFExpertWeights:
    """Views of one MoE layer's routed expert weights in ``nn.Linear`` orientation.

    Writing into any of these writes the live parameter. ``E`` experts,
    ``H`` hidden size, ``I`` per-expert intermediate size.
    """

    gate: Tensor | None
    """``[E, I, H]`` gate projection; ``None`` for non-gated experts."""
    up: Tensor
    """``[E, I, H]`` up projection."""
    down: Tensor
    """``[E, H, I]`` down projection."""
    gate_bias: Tensor | None = None
    """``[E, I]``, when the experts have biases and a gate."""
    up_bias: Tensor | None = None
    """``[E, I]``, when the experts have biases."""
    down_bias: Tensor | None = None
    """``[E, H]``, when the experts have biases."""

    def tensors(self) -> tuple[Tensor, ...]:
        """The present views in the documented order (gate, up, down, then the biases)."""
        order = (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias)
        return tuple(t for t in order if t is not None)


@attrs.frozen
class Layout:
    """How an experts module stores its weights (``use_experts_implementation`` flags)."""

    is_transposed: bool
    is_concatenated: bool
    has_gate: bool
    has_bias: bool


def read_layout(experts: nn.Module, fused: Tensor, down: Tensor) -> Layout | str:
    """The storage layout: the decorator's flags when present, else inferred from shapes."""
    has_gate = tensor_attr(experts, "gate_up_proj") is not None
    has_bias = any(
        tensor_attr(experts, name) is not None
        for name in ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias")
    )
    flags = [flag(experts, n) for n in ("is_transposed", "is_concatenated", "has_gate", "has_bias")]
    if all(f is not None for f in flags):
        is_transposed, is_concatenated, flag_gate, flag_bias = (bool(f) for f in flags)
        if flag_gate != has_gate or flag_bias != has_bias:
            return (
                f"its flags say has_gate={flag_gate}, has_bias={flag_bias} but its parameters "
                f"say has_gate={has_gate}, has_bias={has_bias}"
            )
        return Layout(is_transposed, is_concatenated, has_gate, has_bias)
    # Undecorated experts (Llama-4, Step3p7, ...): the hidden size is the dimension
    # the two projections share. Untransposed: fused [E, m*I, H], down [E, H, I];
    # transposed: fused [E, H, m*I], down [E, I, H]. Both can only hold at once when
    # a size is 0. Gate and up are assumed concatenated (interleaving is invisible
    # in shapes and no undecorated family uses it).
    mult = 2 if has_gate else 1
    _, f1, f2 = fused.shape
    _, d1, d2 = down.shape
    if f2 == d1 and f1 == mult * d2:
        return Layout(False, True, has_gate, has_bias)
    if f1 == d2 and f2 == mult * d1:
        return Layout(True, True, has_gate, has_bias)
    return (
        f"fused projection {tuple(fused.shape)} and down_proj {tuple(down.shape)} fit neither "
        "[E, 2I, H]/[E, H, I] nor the transposed [E, H, 2I]/[E, I, H]"
    )


def weight_views(experts: nn.Module, layout: Layout) -> HFExpertWeights | str:
    fused = tensor_attr(experts, "gate_up_proj" if layout.has_gate else "up_proj")
    down = tensor_attr(experts, "down_proj")
    if fused is None or down is None:
        return "it lacks gate_up_proj/up_proj or down_proj"
    w1 = fused.transpose(1, 2) if layout.is_transposed else fused
    w2 = down.transpose(1, 2) if layout.is_transposed else down
    num_experts, hidden, inter = w2.shape
    width = 2 * inter if layout.has_gate else inter
    if tuple(w1.shape) != (num_experts, width, hidden):
        return (
            f"its fused projection views as {tuple(w1.shape)} but down_proj as {tuple(w2.shape)}; "
            f"expected [{num_experts}, {width}, {hidden}]"
        )
    b1 = tensor_attr(experts, "gate_up_proj_bias" if layout.has_gate else "up_proj_bias")
    b2 = tensor_attr(experts, "down_proj_bias")
    if layout.has_bias and (
        b1 is None
        or b2 is None
        or tuple(b1.shape) != (num_experts, width)
        or tuple(b2.shape) != (num_experts, hidden)
    ):
        return f"its biases do not match [{num_experts}, {width}] and [{num_experts}, {hidden}]"
    if not layout.has_gate:
        return HFExpertWeights(None, w1, w2, None, b1, b2)
    if layout.is_concatenated:
        gate, up = w1[:, :inter], w1[:, inter:]
        gate_bias, up_bias = (b1[:, :inter], b1[:, inter:]) if b1 is not None else (None, None)
    else:
        gate, up = w1[:, 0::2], w1[:, 1::2]
        gate_bias, up_bias = (b1[:, 0::2], b1[:, 1::2]) if b1 is not None else (None, None)
    return HFExpertWeights(gate, up, w2, gate_bias, up_bias, b2)
