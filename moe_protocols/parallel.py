"""Expert-parallel context: which EP rank this process is and how to talk to the others.

Passed explicitly to the models and the EPLB state; there are no hidden globals.
A single-process context (the default) needs no ``torch.distributed`` at all.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Final, Literal

import attrs
import torch
import torch.distributed as dist

from moe_protocols._torch_typed import all_reduce
from moe_protocols.errors import EplbConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch.distributed import ProcessGroup

__all__ = [
    "MAX_COLLECTIVE_TIMEOUT",
    "MIN_COLLECTIVE_TIMEOUT",
    "ExpertParallelContext",
    "ReduceOpName",
]

ReduceOpName = Literal["sum", "max", "min"]
"""Reductions :meth:`ExpertParallelContext.all_reduce_` offers."""

_REDUCE_OPS: Final = {
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}

MIN_COLLECTIVE_TIMEOUT: Final = timedelta(milliseconds=1)
"""Shortest collective deadline: torch waits in whole milliseconds, and 0 means "forever"."""
MAX_COLLECTIVE_TIMEOUT: Final = timedelta(days=1)
"""Longest collective deadline: far longer ones overflow torch's clock and time out at once."""


def _check_rank(
    instance: ExpertParallelContext, attribute: attrs.Attribute[int], value: int
) -> None:
    if not 0 <= value < instance.world_size:
        raise ValueError(f"rank must be in [0, world_size={instance.world_size}), got {value}")


def _check_nodes(
    instance: ExpertParallelContext, attribute: attrs.Attribute[int], value: int
) -> None:
    if instance.world_size % value != 0:
        raise ValueError(
            f"num_nodes={value} must divide world_size={instance.world_size} "
            "(every node holds the same number of EP ranks)"
        )


def _to_timeout(value: timedelta | None) -> timedelta | None:
    """``collective_timeout`` as a ``timedelta`` (from anything with ``total_seconds()``)."""
    if value is None:
        return None
    total = getattr(value, "total_seconds", None)
    seconds = total() if callable(total) else None
    if not isinstance(seconds, float):
        raise EplbConfigError(
            "ExpertParallelContext.collective_timeout must be None or a datetime.timedelta, "
            f"got {type(value).__name__} {value!r}"
        )
    if (
        not MIN_COLLECTIVE_TIMEOUT.total_seconds()
        <= seconds
        <= MAX_COLLECTIVE_TIMEOUT.total_seconds()
    ):
        raise EplbConfigError(
            f"ExpertParallelContext.collective_timeout must be between {MIN_COLLECTIVE_TIMEOUT} "
            f"and {MAX_COLLECTIVE_TIMEOUT}, got {value!r}"
        )
    return timedelta(seconds=seconds)


@attrs.frozen
class ExpertParallelContext:
    """The EP group this process belongs to.

    ``rank``/``world_size`` are positions in the EP group (not global ranks);
    ``group`` is the ``torch.distributed`` process group carrying EPLB
    collectives (``None`` = the default group); ``num_nodes`` lets
    hierarchical policies keep expert groups within a node. Physical slot ``p``
    lives on EP rank ``p // num_local_physical_experts`` (rank-major).
    ``collective_timeout`` is the deadline of each EPLB collective (``None``:
    the process group's own timeout); see :class:`~moe_protocols.errors.CollectiveTimeoutError`.
    """

    world_size: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    rank: int = attrs.field(default=0, validator=_check_rank)
    num_nodes: int = attrs.field(default=1, validator=[attrs.validators.ge(1), _check_nodes])
    group: ProcessGroup | None = attrs.field(default=None, eq=False)
    collective_timeout: timedelta | None = attrs.field(default=None, converter=_to_timeout)

    @classmethod
    def from_process_group(
        cls,
        group: ProcessGroup | None = None,
        *,
        num_nodes: int = 1,
        collective_timeout: timedelta | None = None,
    ) -> ExpertParallelContext:
        """Build the context of this process in an initialised ``torch.distributed`` group.

        Raises:
            RuntimeError: ``torch.distributed`` is not initialised.
            EplbConfigError: ``collective_timeout`` is not a ``timedelta`` between
                :data:`MIN_COLLECTIVE_TIMEOUT` and :data:`MAX_COLLECTIVE_TIMEOUT`.
        """
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised; call init_process_group first "
                "or use ExpertParallelContext() for a single process"
            )
        return cls(
            world_size=dist.get_world_size(group),
            rank=dist.get_rank(group),
            num_nodes=num_nodes,
            group=group,
            collective_timeout=collective_timeout,
        )

    @property
    def is_distributed(self) -> bool:
        """Whether collectives are needed (more than one EP rank)."""
        return self.world_size > 1

    def global_rank(self, rank: int) -> int:
        """The ``torch.distributed`` (default-group) rank of EP rank ``rank``, for P2P ops."""
        if self.group is None:
            return rank
        return dist.get_global_rank(self.group, rank)

    def all_reduce_(
        self,
        tensor: torch.Tensor,
        op: ReduceOpName = "sum",
        *,
        wait: Callable[[dist.Work], object] | None = None,
    ) -> torch.Tensor:
        """Reduce ``tensor`` over the EP group in place (no-op on one rank); return it.

        A collective: every EP rank must call it, in the same order as every
        other collective on ``group``. With ``wait`` the reduction is issued
        with ``async_op=True`` and its work handed to ``wait``, which returns
        once the work completed or raises (EPLB passes a deadline there).
        """
        if not self.is_distributed:
            return tensor
        if wait is None:
            all_reduce(tensor, op=_REDUCE_OPS[op], group=self.group, async_op=False)
            return tensor
        work = all_reduce(tensor, op=_REDUCE_OPS[op], group=self.group, async_op=True)
        if work is not None:  # None only on a rank outside the group
            wait(work)
        return tensor
