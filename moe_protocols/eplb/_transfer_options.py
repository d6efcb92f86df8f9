"""How expert weights move between EP ranks: the options every rank passes, and the sizes they give.

Every rank must pass the same :class:`TransferOptions`; the batch sizes and
row layouts they give for a model (:func:`receive_budget`,
:func:`layout_digest`) are what the ranks compare before moving anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import attrs
import torch
from torch import Tensor

from moe_protocols._validate import int_field
from moe_protocols.errors import EplbConfigError

from ._agreement import digest
from ._deadline import PhaseHook

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._transfer import TransferPlan

__all__ = [
    "FaultHook",
    "TransferJob",
    "TransferOptions",
    "default_buffer_bytes",
    "layout_digest",
    "layout_digest_under",
    "receive_budget",
    "row_bytes",
]

FaultHook: TypeAlias = Callable[[int, int], None]
"""Test hook ``hook(ep_rank, layer)``, called on every rank while each layer is prepared.

Raising there makes this rank fail at that layer; blocking there makes it a
hung peer. For fault-injection tests; leave it ``None`` in production.
"""


def _to_device(value: torch.device | str | None) -> torch.device | None:
    if value is None:
        return None
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise EplbConfigError(
            f"TransferOptions.staging_device: {value!r} is not a torch device: {exc}"
        ) from exc


_check_buffer_bytes = int_field(
    1,
    EplbConfigError,
    owner="TransferOptions",
    template="{label} must be None or an int >= {minimum}, got {value!r}",
    optional=True,
)


def _check_hook(
    instance: TransferOptions,
    attribute: attrs.Attribute[Any],
    value: object,
) -> None:
    if value is not None and not callable(value):
        raise EplbConfigError(
            f"TransferOptions.{attribute.name} must be None or callable, got {type(value).__name__}"
        )


@attrs.frozen
class TransferOptions:
    """How expert weights move between EP ranks (ignored in one process: every move is local).

    Every rank must use the same options; the ranks check that they agree on
    the resulting batch sizes before moving anything.
    """

    buffer_bytes: int | None = attrs.field(default=None, validator=_check_buffer_bytes)
    """Most bytes a rank receives per batch, and the receive buffer's size when staging
    elsewhere. ``None``: one layer of this rank's local expert weights (vLLM's
    ``expert_buffer``). Must hold one expert row (all weight tensors of a slot)."""
    staging_device: torch.device | None = attrs.field(default=None, converter=_to_device)
    """Where staged rows wait for the vote. ``None``: next to the weights, and rows are
    received straight into the staging. A device (e.g. ``"cpu"`` for GPU weights,
    to keep device memory bounded by ``buffer_bytes``): rows are received into a
    buffer on the weights' device and copied there."""
    fault_hook: FaultHook | None = attrs.field(default=None, validator=_check_hook, eq=False)
    """Fault injection for tests (see :data:`FaultHook`)."""
    phase_hook: PhaseHook | None = attrs.field(default=None, validator=_check_hook, eq=False)
    """Fault injection for tests, called before each collective of a multi-rank rearrangement
    or ``update_mapping`` with the phase and the EP rank (see ``PhaseHook``)."""


@attrs.frozen(eq=False)
class TransferJob:
    """One model's share of a cross-rank transfer."""

    model_name: str
    """Name used in error messages."""
    plan: TransferPlan
    """This rank's plan (``plan.rank`` must be the EP rank)."""
    expert_weights: Sequence[Sequence[Tensor]]
    """``expert_weights[layer][k]`` is ``[num_local, ...]``; read here, written only on commit."""


# ----------------------------------------------------------------------------- sizing


def row_bytes(weights: Sequence[Tensor]) -> tuple[int, ...]:
    """Bytes of one expert row of each weight tensor of a layer."""
    return tuple((w.numel() // max(w.shape[0], 1)) * w.element_size() for w in weights)


def default_buffer_bytes(expert_weights: Sequence[Sequence[Tensor]]) -> int:
    """One layer of local expert weights (the largest layer): the default ``buffer_bytes``."""
    return max(sum(w.numel() * w.element_size() for w in layer) for layer in expert_weights)


def receive_budget(expert_weights: Sequence[Sequence[Tensor]], options: TransferOptions) -> int:
    """Bytes a rank receives per batch under ``options`` for a model with these weights.

    Raises:
        EplbConfigError: ``buffer_bytes`` cannot hold one expert row of some layer.
    """
    budget = options.buffer_bytes or default_buffer_bytes(expert_weights)
    for layer, weights in enumerate(expert_weights):
        row = sum(row_bytes(weights))
        if row > budget:
            raise EplbConfigError(
                f"TransferOptions.buffer_bytes={budget} cannot hold one expert row of MoE layer "
                f"{layer} ({row} bytes over {len(weights)} weight tensors)"
            )
    return budget


def layout_digest(expert_weights: Sequence[Sequence[Tensor]], budget: int) -> int:
    """Fingerprint of what ranks must agree on to pair their P2P ops: row layouts and batches."""
    return digest(
        [
            [(str(w.dtype), row_bytes([w])[0], w.shape[0]) for w in layer]
            for layer in expert_weights
        ],
        budget,
    )


def layout_digest_under(
    expert_weights: Sequence[Sequence[Tensor]], options: TransferOptions
) -> int:
    """:func:`layout_digest` of a model's weights at the batch size ``options`` give them."""
    return layout_digest(expert_weights, receive_budget(expert_weights, options))
