"""Load recording: the hooks that count the router's real choices into a layer's load row.

Nothing here is installed until ``set_eplb_state``; the hooks only add into
the row they are given (``index_add_`` of ones, ids outside ``[0, E)``
ignored, no host sync) and note that they fired.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, cast

import attrs
import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.hooks import RemovableHandle

__all__ = [
    "INDEX_HOOK",
    "SCORES_HOOK",
    "Recording",
    "index_hook",
    "placement_problem",
    "scores_hook",
]

INDEX_HOOK: Final = "experts pre-hook (top_k_index)"
"""How a layer records when its experts module receives the chosen expert ids."""

SCORES_HOOK: Final = "router hook (non-zero scores)"
"""How a layer records when its experts run densely and the router returns ``[T, E]`` scores."""


@attrs.define(eq=False)
class Recording:
    """One layer's live EPLB views and its installed hook."""

    row: Tensor
    """``[P]`` this layer's row of ``expert_load_view``."""
    logical_to_physical: Tensor
    """``[E, max_replicas]`` this layer's row of ``logical_to_physical_map``."""
    replica_count: Tensor
    """``[E]`` this layer's row of ``logical_replica_count``."""
    handle: RemovableHandle | None = None
    fired: bool = False


def index_hook(
    recording: Recording, last_expert: int
) -> Callable[[nn.Module, tuple[object, ...], dict[str, object]], None]:
    row = recording.row

    def record_chosen_experts(
        module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> None:
        ids = args[1] if len(args) > 1 else _index_kwarg(kwargs)
        if not isinstance(ids, Tensor) or ids.is_floating_point():
            return
        recording.fired = True
        flat = ids.reshape(-1)
        if flat.device != row.device:
            flat = flat.to(row.device, non_blocking=True)
        # Sentinels (-1 padding, ids >= E marking "not on this rank") are clamped
        # onto a real expert with weight 0: no boolean indexing, so no host sync.
        safe = flat.clamp(0, last_expert)
        row.index_add_(0, safe, (safe == flat).to(row.dtype))

    return record_chosen_experts


def _index_kwarg(kwargs: Mapping[str, object]) -> object:
    for value in kwargs.values():
        if isinstance(value, Tensor) and not value.is_floating_point():
            return value
    return None


def scores_hook(
    recording: Recording, num_experts: int
) -> Callable[[nn.Module, tuple[object, ...], object], None]:
    row = recording.row

    def record_nonzero_scores(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        scores = output
        if isinstance(output, tuple) and output:
            scores = cast("tuple[object, ...]", output)[0]
        if not isinstance(scores, Tensor) or scores.shape[-1] != num_experts:
            return
        recording.fired = True
        chosen = (scores.reshape(-1, num_experts) != 0).sum(dim=0, dtype=row.dtype)
        if chosen.device != row.device:
            chosen = chosen.to(row.device, non_blocking=True)
        row.add_(chosen)

    return record_nonzero_scores


def placement_problem(recording: Recording, num_experts: int) -> str | None:
    expected = torch.arange(num_experts, device=recording.logical_to_physical.device)
    first = recording.logical_to_physical[:, 0].to(torch.int64)
    if not bool((first == expected).all()) or not bool((recording.replica_count == 1).all()):
        return (
            "the EPLB maps place logical experts in other physical slots (or replicate them), "
            "but transformers routes every token to the weights at its logical id: only the "
            "identity placement (slot e holds expert e, one replica) is valid"
        )
    return None
