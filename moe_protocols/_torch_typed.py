"""Typed doors to the few torch APIs whose own annotations leave their types unknown.

torch annotates ``Tensor.tolist()`` as a bare ``list`` and leaves some parameters of
``torch.random`` and ``torch.distributed`` unannotated, so a strict checker sees
``Unknown`` flow from them into our code. Each function here states the type that
the call really returns for the way we use it, and is the one place that names the
untyped torch API (and carries the checker's exemption, with its reason).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from collections.abc import Iterator
    from contextlib import AbstractContextManager

    from torch import Tensor, nn

__all__ = [
    "all_reduce",
    "barrier",
    "float_list",
    "fork_rng",
    "from_numpy",
    "int_list",
    "int_rows",
    "manual_seed",
    "named_modules",
]


def int_list(values: Tensor) -> list[int]:
    """The elements of a 1-D integer tensor as Python ints (``Tensor.tolist``, typed)."""
    return values.tolist()  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]  # torch's stub returns a bare list


def int_rows(values: Tensor) -> list[list[int]]:
    """The rows of a 2-D integer tensor as lists of Python ints (``Tensor.tolist``, typed)."""
    return values.tolist()  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]  # torch's stub returns a bare list


def float_list(values: Tensor) -> list[float]:
    """The elements of a 1-D floating tensor as Python floats (``Tensor.tolist``, typed)."""
    return values.tolist()  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]  # torch's stub returns a bare list


def named_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``root.named_modules()``, typed (torch infers its recursive generator partly unknown)."""
    yield from root.named_modules()


def fork_rng() -> AbstractContextManager[None]:
    """``torch.random.fork_rng(devices=[])``: the CPU generator's state is restored on exit."""
    forked = torch.random.fork_rng(devices=[])  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]  # torch leaves `devices` unannotated
    return cast("AbstractContextManager[None]", forked)


def manual_seed(seed: int) -> None:
    """``torch.manual_seed(seed)``, typed (torch leaves ``seed`` unannotated)."""
    torch.manual_seed(seed)  # pyright: ignore[reportUnknownMemberType]  # torch leaves `seed` unannotated


def from_numpy(array: object) -> Tensor:
    """``torch.from_numpy(array)``, typed (torch leaves ``ndarray`` unannotated)."""
    return torch.from_numpy(array)  # pyright: ignore[reportUnknownMemberType]  # torch leaves `ndarray` unannotated


def barrier() -> None:
    """``torch.distributed.barrier()`` on the default group, typed."""
    dist.barrier()  # pyright: ignore[reportUnknownMemberType]  # torch leaves `group` unannotated


def all_reduce(
    tensor: Tensor, *, op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None, async_op: bool
) -> dist.Work | None:
    """``torch.distributed.all_reduce``, typed: the work handle when ``async_op``, else None."""
    work = dist.all_reduce(  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]  # torch leaves `op` and `group` unannotated
        tensor, op=op, group=group, async_op=async_op
    )
    return cast("dist.Work | None", work)
