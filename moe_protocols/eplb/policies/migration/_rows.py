"""Rows (independent packing problems) and the small tensor primitives every step uses."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Final

import attrs
import torch

from moe_protocols._torch_typed import from_numpy

__all__ = [
    "EPS",
    "Rows",
    "counts_of",
    "descending_order",
    "expand",
    "first_copies",
    "holding",
    "repeats",
    "replica_cap",
    "smallest_mask",
]

# Improvements smaller than this fraction of the target are float noise.

# Improvements smaller than this fraction of the target are float noise.
EPS: Final = 1e-9


def _load_numpy() -> ModuleType | None:
    # Optional: numpy only speeds up one sort; torch's sort is the fallback.
    try:
        return importlib.import_module("numpy")
    except ImportError:  # pragma: no cover - depends on the environment
        return None


_NUMPY: Final = _load_numpy()


def replica_cap(num_slots: int, num_experts: int, num_ranks: int) -> int:
    """Most replicas per expert: one per rank, unless the slots force more."""
    return max(num_ranks, -(-num_slots // num_experts))


@attrs.frozen
class Rows:
    """A batch of packing problems: ``X`` rows of ``n`` experts onto ``K`` ranks of ``S`` slots."""

    load: torch.Tensor  # [X, n] float64
    num_ranks: int
    slots: int
    rows_per_layer: int

    @property
    def num_slots(self) -> int:
        return self.num_ranks * self.slots

    @property
    def cap(self) -> int:
        return replica_cap(self.num_slots, self.load.shape[1], self.num_ranks)

    def target(self, hottest: torch.Tensor, tolerance: float) -> torch.Tensor:
        """``[X]`` the layer's ``(1 + tolerance) * max LB`` for every row."""
        bound = torch.maximum(self.load.sum(dim=1) / self.num_ranks, hottest)
        per_layer = bound.view(-1, self.rows_per_layer).amax(dim=1, keepdim=True)
        return per_layer.expand(-1, self.rows_per_layer).reshape(-1) * (1 + tolerance)


def smallest_mask(values: torch.Tensor, how_many: torch.Tensor) -> torch.Tensor:
    """Mask of the ``how_many[x]`` smallest entries of each row of ``[X, m]``."""
    k = int(how_many.max())
    mask = torch.zeros_like(values, dtype=torch.bool)
    if k > 0:
        index = torch.topk(values, k, dim=1, largest=False).indices
        mask.scatter_(1, index, torch.arange(k).unsqueeze(0) < how_many.unsqueeze(1))
    return mask


def expand(expert: torch.Tensor, count: torch.Tensor, width: int) -> torch.Tensor:
    """Repeat ``expert[x, i]`` ``count[x, i]`` times, in order: ``[X, width]``."""
    start = count.cumsum(dim=1) - count
    marker = torch.zeros(expert.shape[0], width + 1, dtype=torch.int64)
    marker.scatter_add_(1, start.clamp(max=width), torch.ones_like(start))
    return expert.gather(1, marker[:, :width].cumsum(dim=1) - 1)


def repeats(placed: torch.Tensor) -> torch.Tensor:
    """``[X, K, S]`` -> mask of slots whose expert an earlier slot of the same rank holds."""
    slots = placed.shape[2]
    earlier = torch.ones(slots, slots, dtype=torch.bool).tril(diagonal=-1)
    return ((placed.unsqueeze(3) == placed.unsqueeze(2)) & earlier).any(dim=3)


def first_copies(placed: torch.Tensor) -> torch.Tensor:
    """``[X, K, S]`` -> a copy with every repeat of an expert within a rank turned into ``-1``."""
    return placed.masked_fill(repeats(placed), -1)


def counts_of(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[X, Q]`` expert ids (``-1`` = free) -> ``[X, n]`` replicas per expert."""
    counts = torch.zeros(flat.shape[0], num_experts + 1, dtype=torch.int64)
    counts.scatter_add_(1, torch.where(flat < 0, num_experts, flat), torch.ones_like(flat))
    return counts[:, :num_experts]


def holding(origin: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[X, K, S]`` old placement (``-1`` free) -> ``[X, K * n]``: rank ``k`` held expert ``e``."""
    num_rows, num_ranks, _slots = origin.shape
    offset = (torch.arange(num_ranks) * (num_experts + 1)).view(1, -1, 1)
    held = torch.zeros(num_rows, num_ranks * (num_experts + 1), dtype=torch.bool)
    index = (torch.where(origin >= 0, origin, num_experts) + offset).view(num_rows, -1)
    held.scatter_(1, index, True)
    return held.view(num_rows, num_ranks, num_experts + 1)[:, :, :num_experts].reshape(num_rows, -1)


def descending_order(values: torch.Tensor) -> torch.Tensor:
    """``[X, m]`` -> indices sorting each row descending (deterministic)."""
    if _NUMPY is not None and values.device.type == "cpu":
        # numpy's sort is several times faster than torch's on CPU for short
        # rows; both are stable, so ties keep index order and the two paths
        # give the same placement whether or not numpy is installed.
        array = values.detach().numpy()
        return from_numpy(_NUMPY.argsort(-array, axis=1, kind="stable"))
    return torch.sort(values, dim=1, descending=True, stable=True).indices
