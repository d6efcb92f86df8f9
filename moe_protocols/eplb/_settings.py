"""The settings an EPLB state is built with, checked: integrity mode, placement topology, device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moe_protocols.errors import EplbConfigError

from . import _limits
from ._fingerprint import INTEGRITY_MODES, IntegrityMode

if TYPE_CHECKING:
    from moe_protocols.parallel import ExpertParallelContext

__all__ = ["checked_integrity", "placement_topology", "torch_device"]


def checked_integrity(integrity: object) -> IntegrityMode:
    """``integrity`` if it is one of :data:`INTEGRITY_MODES`; else an ``EplbConfigError``."""
    for mode in INTEGRITY_MODES:
        if integrity == mode:
            return mode
    raise EplbConfigError(
        f"EplbState: integrity must be one of {', '.join(map(repr, INTEGRITY_MODES))}, "
        f"got {integrity!r}"
    )


def placement_topology(
    ep: ExpertParallelContext, num_ranks: int | None, num_nodes: int | None
) -> tuple[int, int]:
    """The ``(ranks, nodes)`` a state plans for: the EP group's unless given, checked to fit it."""
    ranks = ep.world_size if num_ranks is None else num_ranks
    nodes = ep.num_nodes if num_nodes is None else num_nodes
    for name, value in (("num_ranks", ranks), ("num_nodes", nodes)):
        if type(value) is not int or value < 1:
            raise EplbConfigError(f"EplbState: {name} must be an int >= 1, got {value!r}")
        limit = "MAX_RANKS" if name == "num_ranks" else "MAX_NODES"
        _limits.check_count(f"EplbState: {name}", value, limit, EplbConfigError)
    if ranks % ep.world_size != 0:
        raise EplbConfigError(
            f"EplbState: num_ranks={ranks} must be a multiple of the EP group's "
            f"world_size={ep.world_size} (each process holds whole placement ranks)"
        )
    if ranks % nodes != 0:
        raise EplbConfigError(
            f"EplbState: num_nodes={nodes} must divide num_ranks={ranks} "
            "(every node holds the same number of ranks)"
        )
    return ranks, nodes


def torch_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``; else an ``EplbConfigError``."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EplbConfigError(f"EplbState: device {device!r} is not a torch device: {exc}") from exc
