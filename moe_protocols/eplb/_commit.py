"""Moving planned weights and committing them: on every rank or on none, checked by fingerprint.

Staging reads the old weights only (locally in one process, through the
group-wide exchange across ranks). The commit first checks the staged rows
against the experts' fingerprints and that every weight can be written in
place, then writes, checks what was written and only then commits the maps;
any failure, on any rank, puts the written rows back on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, final

import attrs
import torch
from torch import Tensor

from moe_protocols.errors import MoEProtocolsError, TransferError

from ._distributed import TransferJob, TransferOptions, exchange_expert_weights
from ._integrity import (
    UndoRows,
    build_table,
    check_staged,
    check_writable,
    check_written,
    slot_digests,
)
from ._transfer import StagedTransfer, TransferPlan, TransferStats, stage_transfer

if TYPE_CHECKING:
    from ._agreement import RankGroup
    from ._deadline import Phase
    from ._fingerprint import IntegrityMode
    from ._planning import ModelPlan
    from ._results import ModelEplbState

__all__ = ["FingerprintTables", "commit", "stage_plans"]


@final
class FingerprintTables:
    """The experts' fingerprints of each registered model: taken once, checked at every move."""

    def __init__(self, integrity: IntegrityMode) -> None:
        """No tables yet; ``integrity`` says how much of each row is fingerprinted."""
        self.integrity: IntegrityMode = integrity
        self._tables: dict[str, Tensor] = {}

    def __getitem__(self, model_name: str) -> Tensor:
        return self._tables[model_name]

    def discard(self, model_name: str) -> None:
        """Forget a model's table (it was removed, or its registration failed)."""
        self._tables.pop(model_name, None)

    def clear(self) -> None:
        """Forget every table."""
        self._tables.clear()

    def take_local(self, state: ModelEplbState) -> None:
        """Fingerprint a model held whole by this process (one process: every slot is here)."""
        self._tables[state.model_name] = _table(state, self._local_digests(state))

    def refresh(self, state: ModelEplbState, group: RankGroup) -> None:
        """Fingerprint a model again from every rank's slots (a collective across ranks)."""
        self._tables[state.model_name] = _table(state, self._gathered_digests(state, group))

    def ensure(self, plans: Sequence[ModelPlan], group: RankGroup) -> None:
        """Across ranks, fingerprint the models that have not been yet (every rank calls it)."""
        if self.integrity == "off":
            return
        for plan in plans:
            if plan.state.model_name not in self._tables:
                self.refresh(plan.state, group)

    def _local_digests(self, state: ModelEplbState) -> Tensor:
        return slot_digests(state.model.expert_weights, self.integrity)

    def _gathered_digests(self, state: ModelEplbState, group: RankGroup) -> Tensor:
        """``[L, P]`` fingerprints of every slot of every rank (a collective across ranks)."""
        local = self._local_digests(state)
        ep = group.ep
        if not ep.is_distributed:
            return local
        num_local = state.num_local_physical_experts
        everything = torch.zeros(
            state.num_layers, state.num_physical_experts, dtype=torch.int64, device=group.device
        )
        first = ep.rank * num_local
        everything[:, first : first + num_local] = local.to(group.device)
        return group.collective(
            "fingerprint gather",
            f"gathering the expert fingerprints of model {state.model_name!r}",
            lambda wait: ep.all_reduce_(everything, wait=wait),
        ).cpu()


def _table(state: ModelEplbState, digests: Tensor) -> Tensor:
    return build_table(
        state.model_name,
        digests,
        state.physical_to_logical_map,
        state.num_logical_experts,
        state.num_local_physical_experts,
    )


def _stage(state: ModelEplbState, plan: TransferPlan) -> StagedTransfer:
    started = time.perf_counter()
    staged = stage_transfer(plan, state.model.expert_weights)
    return attrs.evolve(staged, seconds=time.perf_counter() - started)


def stage_plans(
    plans: Sequence[ModelPlan], group: RankGroup, options: TransferOptions
) -> list[StagedTransfer]:
    """Stage every plan: local copies in one process, a group-wide exchange across ranks."""
    if not group.ep.is_distributed:
        return [_stage(p.state, p.transfer) for p in plans]
    jobs = [
        TransferJob(p.state.model_name, p.transfer, p.state.model.expert_weights) for p in plans
    ]
    return list(exchange_expert_weights(jobs, group.ep, options=options, device=group.device))


@attrs.frozen
class _Checks:
    """The checks around a commit, for one group and one set of fingerprint tables."""

    group: RankGroup
    tables: FingerprintTables

    def before(self, name: str, transfer: StagedTransfer, new_map: Tensor) -> None:
        check_writable(name, transfer)
        if self.tables.integrity != "off":
            check_staged(name, transfer, self.tables[name], new_map, self.tables.integrity)

    def after(self, name: str, transfer: StagedTransfer, new_map: Tensor) -> None:
        if self.tables.integrity != "off":
            check_written(name, transfer, self.tables[name], new_map, self.tables.integrity)

    def verify(
        self,
        pairs: Sequence[tuple[ModelPlan, StagedTransfer]],
        check: Callable[[str, StagedTransfer, Tensor], None],
        phase: Phase,
        what: str,
        undo: Sequence[UndoRows] = (),
        failure: Exception | None = None,
    ) -> None:
        """Run ``check`` on every transfer and agree across ranks; on any failure put
        ``undo`` back and raise (this rank's error, or one naming the failed rank)."""
        if failure is None:
            try:
                for plan, transfer in pairs:
                    check(plan.state.model_name, transfer, plan.new_map)
            except Exception as exc:
                failure = exc
        try:
            failed_rank = self.group.vote(failure, phase, what).failed_rank
        except MoEProtocolsError:
            # A peer vanished after the commit: this rank must not keep half a move.
            for rows in undo:
                rows.restore()
            raise
        if failed_rank is None:
            return
        for rows in undo:
            rows.restore()
        if failure is not None:
            raise failure
        raise TransferError(
            f"EP rank {failed_rank} failed while {what} (see its error); EP rank "
            f"{self.group.ep.rank} committed nothing",
            rank=failed_rank,
        )


def _write(
    pairs: Sequence[tuple[ModelPlan, StagedTransfer]], rank: int
) -> tuple[list[tuple[TransferStats, float]], Exception | None]:
    """Write every staged transfer into the live weights; a failure is returned, not raised."""
    results: list[tuple[TransferStats, float]] = []
    try:
        for _, transfer in pairs:
            started = time.perf_counter()
            results.append((transfer.commit(), time.perf_counter() - started))
    except Exception as exc:
        failure = TransferError(
            f"EP rank {rank}: writing the staged rows into the live expert "
            f"weights failed ({type(exc).__name__}: {exc}); the rows written so far were "
            "put back and nothing was committed",
            rank=rank,
        )
        failure.__cause__ = exc
        return results, failure
    return results, None


def _commit_maps(plan: ModelPlan) -> None:
    state = plan.state
    # copy_ into the existing tensors: layers (and CUDA graphs) hold their addresses.
    state.physical_to_logical_map.copy_(plan.new_map)
    state.logical_to_physical_map.copy_(plan.logical_maps[0])
    state.logical_replica_count.copy_(plan.logical_maps[1])


def commit(
    plans: Sequence[ModelPlan],
    staged: Sequence[StagedTransfer],
    group: RankGroup,
    tables: FingerprintTables,
) -> list[tuple[TransferStats, float]]:
    """Check the staged rows, commit weights, check what was written, then commit maps.

    Returns each plan's stats and commit seconds. A fingerprint mismatch, a
    weight that cannot be written in place, or a copy that fails part-way,
    on any rank, raises ``TransferError`` on every rank with the weights as
    they were (rows written by the commit are put back) and the maps unchanged.
    """
    checks = _Checks(group, tables)
    pairs = list(zip(plans, staged, strict=True))
    # Before any live byte changes: the staged rows (the undo relies on them)
    # and whether every weight can be written at all.
    checks.verify(pairs, checks.before, "staged check", "checking the staged expert rows")
    undo = [UndoRows.capture(transfer, plan.old_map) for plan, transfer in pairs]
    results, failure = _write(pairs, group.ep.rank)
    checks.verify(
        pairs, checks.after, "commit check", "checking the committed expert rows", undo, failure
    )
    for plan in plans:
        _commit_maps(plan)
    return results
