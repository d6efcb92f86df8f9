"""The check of ``expert_weights``: per MoE layer, its ``[local_physical, ...]`` tensors."""

from __future__ import annotations

from collections.abc import Mapping, MutableSequence, Sequence
from typing import cast

import torch

from moe_protocols.conformance._bounds import (
    MAX_LAYERS_CHECKED,
    MAX_WEIGHTS_CHECKED,
    Budget,
    capped,
    over_budget,
)
from moe_protocols.conformance._read import MISSING, describe, describe_exception, is_text, item
from moe_protocols.conformance._report import Problem, ProblemKind

__all__ = ["check_expert_weights"]


def check_expert_weights(
    value: object,
    counts: Mapping[str, int | None],
    found: list[Problem],
    invariants: list[Problem],
    budget: Budget,
) -> None:
    """``MutableSequence[Sequence[Tensor]]``: per layer, that layer's ``[local_physical, ...]``."""
    if not isinstance(value, MutableSequence):
        found.append(
            Problem(
                "expert_weights",
                ProblemKind.WRONG_TYPE,
                "must be a mutable sequence (a list) with one sequence of tensors per MoE layer, "
                f"got {describe(value)}",
            )
        )
        return
    value = cast("MutableSequence[object]", value)  # items are checked one by one below
    length = len(value)
    _check_length(length, counts.get("num_moe_layers"), found, invariants)
    local = counts.get("num_local_physical_experts")
    items: list[Problem] = []
    shapes: list[Problem] = []
    # By index, never by iteration: a sequence whose __getitem__ never raises
    # IndexError iterates for ever.
    for layer_idx in range(min(length, MAX_LAYERS_CHECKED)):
        if budget.spent():
            items.append(over_budget("expert_weights"))
            break
        member = f"expert_weights[{layer_idx}]"
        weights = _layer_weights(value, layer_idx, member, items)
        for k, weight in enumerate(weights):
            _check_weight(f"{member}[{k}]", weight, local, items, shapes)
    found += capped(items, "expert_weights", "malformed entries")
    invariants += capped(shapes, "expert_weights", "tensors with the wrong dim 0")


def _check_length(
    length: int, num_moe_layers: int | None, found: list[Problem], invariants: list[Problem]
) -> None:
    """One entry per MoE layer once filled, and no more than a model may have."""
    if length and num_moe_layers is not None and length != num_moe_layers:
        invariants.append(
            Problem(
                "expert_weights",
                ProblemKind.INVARIANT,
                f"holds {length} layers of weights but num_moe_layers is {num_moe_layers}",
            )
        )
    if length > MAX_LAYERS_CHECKED:
        found.append(
            Problem(
                "expert_weights",
                ProblemKind.INVALID_VALUE,
                f"holds {length} layers, more than the {MAX_LAYERS_CHECKED} a model may have",
            )
        )


def _layer_weights(
    value: Sequence[object], layer_idx: int, member: str, items: list[Problem]
) -> list[object]:
    """The weights of one layer to check (none when the entry itself is at fault)."""
    layer_weights = item(value, layer_idx, member, items)
    if layer_weights is MISSING:
        return []
    if is_text(layer_weights) or not isinstance(layer_weights, Sequence):
        items.append(
            Problem(
                member,
                ProblemKind.WRONG_TYPE,
                f"must be a sequence of tensors, got {describe(layer_weights)}",
            )
        )
        return []
    layer_weights = cast("Sequence[object]", layer_weights)
    try:
        num_weights = len(layer_weights)
        weights = [layer_weights[k] for k in range(min(num_weights, MAX_WEIGHTS_CHECKED))]
    except Exception as exc:
        items.append(
            Problem(member, ProblemKind.RAISED, f"reading it raised {describe_exception(exc)}")
        )
        return []
    if num_weights > MAX_WEIGHTS_CHECKED:
        items.append(
            Problem(
                member,
                ProblemKind.INVALID_VALUE,
                f"holds {num_weights} weight tensors, more than the {MAX_WEIGHTS_CHECKED} "
                "a MoE layer may have",
            )
        )
    return weights


def _check_weight(
    member: str, weight: object, local: int | None, items: list[Problem], shapes: list[Problem]
) -> None:
    """One weight: a tensor of at least one dim, ``num_local_physical_experts`` long in dim 0."""
    if not isinstance(weight, torch.Tensor):
        items.append(
            Problem(
                member, ProblemKind.WRONG_TYPE, f"must be a torch.Tensor, got {describe(weight)}"
            )
        )
    elif weight.dim() == 0:
        items.append(
            Problem(
                member,
                ProblemKind.INVALID_VALUE,
                "must be [local_physical, ...], got a 0-dim tensor",
            )
        )
    elif local is not None and weight.shape[0] != local:
        shapes.append(
            Problem(
                member,
                ProblemKind.INVARIANT,
                f"dim 0 is {weight.shape[0]} but num_local_physical_experts is {local} "
                f"(shape {list(weight.shape)})",
            )
        )
