"""Size limits checked before anything is allocated, so absurd numbers fail fast and typed.

A count of ``2**40`` experts, a window of ``10**12`` steps or ``num_replicas=2**62``
would otherwise surface as a ``MemoryError``, an ``OverflowError`` or a process
that runs until it is killed. Every public entry point that sizes a tensor from
caller input checks it against these limits first. They sit far above any real
deployment (DeepSeek-V3: 58 MoE layers, 256 experts, 288 slots on 32 ranks),
so a value above one is a bug or hostile input, not a big model.

The limits are module constants, read at call time: a user who really needs
more can raise one (``moe_protocols.eplb.limits.MAX_LOGICAL_EXPERTS = 8192``)
before building the objects that use it. Placement files have their own,
per-call override (``load_placement(..., max_bytes=)``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "MAX_EXPERT_GROUPS",
    "MAX_JSON_DEPTH",
    "MAX_LAYERS",
    "MAX_LAYER_LOAD",
    "MAX_LOGICAL_EXPERTS",
    "MAX_MAP_ENTRIES",
    "MAX_NODES",
    "MAX_PHYSICAL_SLOTS",
    "MAX_PLACEMENT_FILE_BYTES",
    "MAX_RANKS",
    "MAX_REPLICA_MAP_ENTRIES",
    "MAX_WINDOW_ENTRIES",
    "MAX_WINDOW_SIZE",
    "check_count",
    "check_finite_loads",
    "check_product",
]

MAX_LAYERS: int = 1024
"""MoE layers per model (the largest public models have under 100)."""
MAX_LOGICAL_EXPERTS: int = 4096
"""Logical experts per layer; also bounds any expert id a placement may hold."""
MAX_PHYSICAL_SLOTS: int = 8192
"""Physical expert slots per layer (logical plus redundant, over all EP ranks)."""
MAX_RANKS: int = 8192
"""EP ranks of a placement."""
MAX_NODES: int = 8192
"""Nodes of a placement."""
MAX_EXPERT_GROUPS: int = 4096
"""Expert groups (group-limited routing); at most one per logical expert anyway."""
MAX_MAP_ENTRIES: int = 2**20
"""Entries of a ``[layers, physical]`` placement (layers x slots)."""
MAX_REPLICA_MAP_ENTRIES: int = 2**26
"""Entries of a ``[layers, logical, max_replicas]`` map (512 MiB of int64)."""
MAX_WINDOW_SIZE: int = 65536
"""Steps in an EPLB load window (``EplbConfig.window_size``)."""
MAX_WINDOW_ENTRIES: int = 2**28
"""Entries of a ``[window, layers, physical]`` load window (1 GiB of int32)."""
MAX_LAYER_LOAD: float = 1e300
"""Largest load a policy accepts for one layer (summed over its experts).

Loads near the float64 maximum overflow to ``inf`` once summed or scaled and
turn a placement into out-of-range indices; real token counts are below 1e15."""
MAX_JSON_DEPTH: int = 16
"""Nesting depth of a JSON placement file (the format itself needs 3)."""
MAX_PLACEMENT_FILE_BYTES: int = 16 * 2**20
"""Default size limit of a placement file; ``load_placement(..., max_bytes=)`` overrides it.

A JSON placement of 58 layers x 288 slots is about 70 KiB."""

_MODULE: Final = "moe_protocols.eplb.limits"


def _limit_value(name: str) -> float:
    value: float = globals()[name]
    return value


def _show(limit: float) -> str:
    return str(limit) if isinstance(limit, int) else f"{limit:g}"


def check_count(what: str, value: int, limit_name: str, error: Callable[[str], Exception]) -> None:
    """Raise ``error(message)`` when ``value`` exceeds the limit named ``limit_name``.

    ``what`` names the value in the message (``"EplbConfig.window_size"``).
    """
    limit = _limit_value(limit_name)
    if value > limit:
        raise error(
            f"{what}={value} exceeds the limit {limit_name}={_show(limit)}; if that is really "
            f"meant, raise {_MODULE}.{limit_name} first"
        )


def check_product(
    what: str, factors: tuple[int, ...], limit_name: str, error: Callable[[str], Exception]
) -> None:
    """Raise ``error(message)`` when the product of ``factors`` (a tensor's shape) is too big."""
    limit = _limit_value(limit_name)
    entries = math.prod(factors)
    if entries > limit:
        shape = " x ".join(map(str, factors))
        raise error(
            f"{what} would have {shape} = {entries} entries, over the limit "
            f"{limit_name}={_show(limit)}; if that is really meant, raise "
            f"{_MODULE}.{limit_name} first"
        )


def check_finite_loads(
    what: str, layer_totals: list[float], error: Callable[[str], Exception]
) -> None:
    """Raise ``error`` when a layer's total load exceeds :data:`MAX_LAYER_LOAD`.

    ``layer_totals`` are the per-layer sums of a non-negative, finite load (an
    ``inf`` sum means the layer overflowed and is reported the same way).
    """
    limit = _limit_value("MAX_LAYER_LOAD")
    for layer, total in enumerate(layer_totals):
        if not total <= limit:  # also catches a nan total
            raise error(
                f"{what}: layer {layer} carries a total load of {total:g}, over the limit "
                f"MAX_LAYER_LOAD={_show(limit)} (loads that large overflow once summed or "
                f"scaled); rescale the loads, or raise {_MODULE}.MAX_LAYER_LOAD first"
            )
