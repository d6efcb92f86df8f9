"""D'Hondt replica counts with a cap per expert, shared by the migration-aware policy and bounds."""

from __future__ import annotations

import functools

import torch

from moe_protocols.eplb import _limits
from moe_protocols.errors import PolicyError

__all__ = ["replica_counts"]


@functools.lru_cache(maxsize=64)
def _dhondt_candidates(n: int, extra: int, cap: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The quotients D'Hondt can pick: ``(experts to consider, owner [C], divisor [C])``.

    Only the ``extra`` heaviest experts can get an extra replica, and the
    ``i``-th heaviest (from 0) gets at most ``extra // (i + 1)`` (every heavier
    expert gets at least as many), so about ``extra * ln(extra)`` candidates
    suffice instead of ``extra * cap``.
    """
    heavy = min(n, extra)
    owners: list[int] = []
    divisors: list[int] = []
    for i in range(heavy):
        depth = min(extra // (i + 1), cap - 1)
        owners += [i] * depth
        divisors += range(1, depth + 1)
    return (
        heavy,
        torch.tensor(owners, dtype=torch.int64),
        torch.tensor(divisors, dtype=torch.float64),
    )


def replica_counts(
    load: torch.Tensor, num_slots: int, max_per_expert: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """D'Hondt replica counts with a cap, and the hottest-replica load they achieve.

    Minimises ``max_e load[e] / count[e]`` subject to ``count >= 1``,
    ``count <= max_per_expert`` and ``sum(count) == num_slots``: each extra
    replica goes to the expert with the largest load per replica.

    Args:
        load: ``[X, n]`` non-negative float loads, one row per problem.
        num_slots: replicas per row; ``n <= num_slots <= n * max_per_expert``.
        max_per_expert: cap on one expert's replicas (the ranks of the row).

    Returns:
        ``(count [X, n] int64, hottest [X] float64)``.

    Raises:
        PolicyError: (a ``ValueError``) no such counts exist, or ``num_slots``
            exceeds ``MAX_PHYSICAL_SLOTS``.
    """
    num_rows, n = load.shape
    _limits.check_count("num_slots", num_slots, "MAX_PHYSICAL_SLOTS", PolicyError)
    extra = num_slots - n
    if extra < 0 or num_slots > n * max_per_expert:
        raise PolicyError(
            f"cannot place {num_slots} replicas of {n} experts with at most {max_per_expert} each"
        )
    count = torch.ones(num_rows, n, dtype=torch.int64)
    if extra > 0:
        heavy, owner, divisor = _dhondt_candidates(n, extra, max_per_expert)
        heaviest = torch.topk(load, heavy, dim=1).indices
        # Candidate c: the (divisor[c] + 1)-th replica of the owner[c]-th heaviest
        # expert, ranked by the load per replica before adding it.
        quotient = load.gather(1, heaviest)[:, owner] / divisor
        chosen = torch.topk(quotient, extra, dim=1).indices
        added = torch.zeros(num_rows, heavy, dtype=torch.int64)
        added.scatter_add_(1, owner[chosen], torch.ones_like(chosen))
        count.scatter_add_(1, heaviest, added)
    return count, (load / count).amax(dim=1)
