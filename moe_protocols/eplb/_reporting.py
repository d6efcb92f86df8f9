"""What an EPLB state logs: the balancedness of a step's pass, and what each rearrangement did.

Everything goes to the ``moe_protocols.eplb`` logger, on EP rank 0 only. A
warning about the same model (and the same layers) is logged once, then at
DEBUG: a window without load repeats every interval.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, final

import torch

from ._metrics import rank_loads_from_physical
from ._results import BalancednessStats

if TYPE_CHECKING:
    from moe_protocols.parallel import ExpertParallelContext

    from ._results import ModelEplbState, RearrangementResult

__all__ = ["RearrangementLog", "log_pass_balancedness", "logger"]

logger: Final = logging.getLogger("moe_protocols.eplb")


def log_pass_balancedness(
    states: Iterable[ModelEplbState],
    ep: ExpertParallelContext,
    num_ranks: int,
    step: int,
    steps_until_rearrangement: int,
) -> None:
    """Log the balancedness of this step's load pass, summed over ranks (an all-reduce)."""
    for state in states:
        # A copy: the all-reduce must not add other ranks' load into our pass.
        load = ep.all_reduce_(state.expert_load_pass.to(torch.int64))
        rank_load = rank_loads_from_physical(load, num_ranks)
        if ep.rank != 0:
            continue
        stats = BalancednessStats.from_rank_load(state.model_name, rank_load.cpu())
        if not stats.has_data:
            logger.info(
                "EPLB step: %d for model %s: no load recorded in this step (no data), "
                "steps until the next rearrangement: %d",
                step,
                state.model_name,
                steps_until_rearrangement,
            )
            continue
        logger.info(
            "EPLB step: %d for model %s: avg_tokens=%.2f, max_tokens=%d, "
            "balancedness=%.4f, steps until the next rearrangement: %d",
            step,
            state.model_name,
            float(rank_load.double().mean(dim=1).sum()),
            int(rank_load.amax(dim=1).sum()),
            stats.token_weighted,
            steps_until_rearrangement,
        )


@final
class RearrangementLog:
    """Logs each rearrangement's outcome, warning once per model and set of layers."""

    def __init__(self) -> None:
        """Nothing warned about yet."""
        self._warned: set[tuple[str, tuple[int, ...]]] = set()

    def _warn_once(self, key: tuple[str, tuple[int, ...]], message: str, *args: object) -> None:
        if key in self._warned:
            logger.debug(message, *args)
            return
        self._warned.add(key)
        logger.warning(message, *args)

    def log(self, result: RearrangementResult) -> None:
        """Log what ``result`` did to each model (skips and layers without load as warnings)."""
        for summary in result.models.values():
            name = summary.model_name
            if summary.skipped is not None:
                self._warn_once(
                    (name, ()), "EPLB did not rearrange model %r: %s", name, summary.skipped
                )
                continue
            if summary.layers_without_load:
                self._warn_once(
                    (name, summary.layers_without_load),
                    "EPLB: MoE layers %s of model %r recorded no load in the window while "
                    "other layers did; their placement is kept. Check that these layers add "
                    "their routed tokens to their row of expert_load_view",
                    list(summary.layers_without_load),
                    name,
                )
            logger.info(
                "EPLB rearranged experts in %.2f s: %s",
                summary.policy_seconds + summary.transfer_seconds,
                summary,
            )
