"""Byte-for-byte snapshots of everything a rejected call must leave alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from author_models import AuthorMoELM

    from moe_protocols.eplb import EplbState


def tensor_bytes(tensor: torch.Tensor | None) -> tuple[object, ...]:
    """What a tensor is, by value: dtype, shape and every byte (``None`` stays ``None``)."""
    if tensor is None:
        return (None,)
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return (str(tensor.dtype), tuple(tensor.shape), bytes(flat.view(torch.uint8).numpy()))


def state_snapshot(state: EplbState) -> tuple[object, ...]:
    """Counters, and every map, load pass, window and expert weight of every model."""
    parts: list[object] = [
        state.model_names,
        state.steps_taken,
        state.step_counter,
        state.window_step,
        state.num_rearrangements,
    ]
    for name in state.model_names:
        live = state.model_state(name)
        for tensor in (
            live.physical_to_logical_map,
            live.logical_to_physical_map,
            live.logical_replica_count,
            live.expert_load_pass,
            live.expert_load_window,
        ):
            parts.append(tensor_bytes(tensor))
        for layer in live.model.expert_weights:
            parts.extend(tensor_bytes(weight) for weight in layer)
    return tuple(parts)


def wiring_snapshot(lm: AuthorMoELM) -> tuple[object, ...]:
    """Which tensors each layer of an author model holds (by identity) and their bytes."""
    parts: list[object] = []
    for layer in lm.blocks:
        for view in (layer.load, layer.l2p, layer.count):
            parts.append(None if view is None else id(view))
            parts.append(tensor_bytes(view))
        parts.append(tensor_bytes(layer.w))
    parts.append(id(lm.expert_weights))
    return tuple(parts)
