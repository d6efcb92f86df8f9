"""Moving expert weights between EP ranks over ``torch.distributed``, committed by a group vote.

The engine behind a multi-rank :meth:`EplbState.rearrange` and
``update_mapping``. The same code runs on gloo (CPU) and NCCL (GPU): rows
travel with ``dist.batch_isend_irecv`` and the ranks agree through one-element
``all_reduce`` calls.

Every rank walks the MoE layers in the same order and cuts them into the same
*batches* (a function of the group-wide plan): consecutive layers share a batch
while no rank receives more than ``buffer_bytes`` in it; a layer whose traffic
alone exceeds that is split over several batches. Per batch, on every rank:

1. *prepare* each layer that starts in the batch: allocate its staging rows
   and call the fault hook, if any;
2. *agree*: one ``all_reduce`` tells every rank whether any rank has failed so
   far, and the first one (lowest rank) and its layer;
3. *exchange*: post this rank's sends and receives of the batch (from the
   plan's :class:`~moe_protocols.eplb.ExpertTransfer` rows), stage the local
   copies that need staging while the rows are on the wire, wait. Sends read
   the *old* weights (nothing live is written before the commit); a missing
   expert is received once per rank, its other destinations are filled from
   that row by the commit.

After the last batch a final agreement is the commit vote: only if every rank
staged everything does every rank get its staged transfers back to commit.
Otherwise every rank discards them and raises the same
:class:`~moe_protocols.errors.TransferError` naming the failing rank and layer.

Memory per rank while a transfer runs: one staging row per expert received,
plus one per local copy whose source slot the commit overwrites (a swap);
local copies from slots that keep their expert, and further replicas of a
received expert, are copied by the commit without staging. At most all of the
rank's local expert weights, typically much less. With ``staging_device`` set
(e.g. host memory for GPU weights), rows are received into a buffer of
``buffer_bytes`` on the weights' device and copied to the staging device.

Every agreement and every batch's P2P wait has a deadline (see
``_deadline.py``): ``ExpertParallelContext.collective_timeout``, else the
process group's timeout. A rank whose collective or P2P op fails or passes the
deadline (a peer died, hung or closed the connection) does not vote: it
reports in through the group's store, and every rank that reported raises a
:class:`~moe_protocols.errors.TransferTimeoutError` naming the missing ranks
and the phase (``"exchange"`` for the per-batch agreements and P2P, ``"commit
vote"`` for the last agreement). Since the vote needs every rank, no rank
commits. The group is unusable afterwards (gloo closes its connections).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

import attrs
import torch
import torch.distributed as dist
from torch import Tensor

from moe_protocols.errors import TransferError, TransferTimeoutError

# GroupVerdict and digest: importable from here, as before the agreement had its own module.
from ._agreement import GroupVerdict, agree, digest
from ._deadline import run_phase
from ._transfer import (
    ExpertTransfer,
    LayerTransferPlan,
    StagedTransfer,
    _check_weights,  # pyright: ignore[reportPrivateUsage]  # shared inside the private eplb package
    _StagedLayer,  # pyright: ignore[reportPrivateUsage]  # shared inside the private eplb package
)

# The options and sizes: importable from here, where users and tests found them.
from ._transfer_options import (
    FaultHook,
    TransferJob,
    TransferOptions,
    default_buffer_bytes,
    layout_digest,
    receive_budget,
    row_bytes,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from moe_protocols.parallel import ExpertParallelContext

__all__ = [
    "FaultHook",
    "GroupVerdict",
    "TransferJob",
    "TransferOptions",
    "agree",
    "default_buffer_bytes",
    "digest",
    "exchange_expert_weights",
    "layout_digest",
    "receive_budget",
]

_DEFAULT_OPTIONS: Final = TransferOptions()  # a frozen value object

# ----------------------------------------------------------------------------- batches


@attrs.frozen
class _Step:
    """One MoE layer of one job, in the order every rank walks them."""

    job: int
    layer: int


@attrs.frozen
class _Batch:
    """One ``batch_isend_irecv`` round: rows of one or more consecutive layers of one job."""

    parts: tuple[tuple[int, tuple[ExpertTransfer, ...]], ...]
    """``(step, transfers)``: the rows of step ``step`` that cross ranks in this batch."""
    new_steps: tuple[int, ...]
    """Steps prepared (staging allocated, fault hook called) just before this batch."""

    @property
    def first_step(self) -> int:
        return self.new_steps[0] if self.new_steps else self.parts[0][0]


def _split(transfers: Sequence[ExpertTransfer], capacity: int) -> list[list[ExpertTransfer]]:
    """Cut one layer's rows so no rank receives more than ``capacity`` rows per piece:
    the n-th row a rank receives goes in piece ``n // capacity``."""
    seen: dict[int, int] = {}
    pieces: list[list[ExpertTransfer]] = []
    for t in transfers:
        n = seen.get(t.destination_rank, 0)
        seen[t.destination_rank] = n + 1
        while len(pieces) <= n // capacity:
            pieces.append([])
        pieces[n // capacity].append(t)
    return pieces


def _plan_batches(
    steps: Sequence[_Step], jobs: Sequence[TransferJob], budgets: Sequence[int]
) -> list[_Batch]:
    """Group the layers into batches in which no rank receives more than its job's budget.

    Consecutive layers share a batch while every rank's received bytes fit; a
    layer that alone exceeds the budget is split over several batches. A
    function of the group-wide plans, so every rank cuts the same batches and
    every send and receive pairs up inside one.
    """
    batches: list[_Batch] = []
    parts: list[tuple[int, tuple[ExpertTransfer, ...]]] = []
    new_steps: list[int] = []
    received: dict[int, int] = {}

    def flush() -> None:
        if parts or new_steps:
            batches.append(_Batch(tuple(parts), tuple(new_steps)))
        parts.clear()
        new_steps.clear()
        received.clear()

    for index, step in enumerate(steps):
        if index and step.job != steps[index - 1].job:
            flush()
        transfers = jobs[step.job].plan.layers[step.layer].transfers
        row = sum(row_bytes(jobs[step.job].expert_weights[step.layer]))
        budget = budgets[step.job]
        need: dict[int, int] = {}
        for t in transfers:
            need[t.destination_rank] = need.get(t.destination_rank, 0) + row
        if any(received.get(r, 0) + n > budget for r, n in need.items()):
            flush()
        if all(n <= budget for n in need.values()):
            new_steps.append(index)
            if transfers:
                parts.append((index, transfers))
            for r, n in need.items():
                received[r] = received.get(r, 0) + n
            continue
        for piece, chunk in enumerate(_split(transfers, budget // max(row, 1))):
            batches.append(_Batch(((index, tuple(chunk)),), (index,) if piece == 0 else ()))
    flush()
    return batches


# ----------------------------------------------------------------------------- staging


@attrs.frozen(eq=False)
class _PreparedLayer:
    """A layer's staging rows (allocated, not yet filled) and where each one comes from."""

    staged: _StagedLayer
    local: tuple[tuple[int, int], ...]
    """``(row, source slot)``: rows copied from this rank's old weights before the vote."""
    received: dict[int, int]
    """Per received expert, the staging row it lands in."""


def _byte_row(tensor: Tensor) -> Tensor:
    """A tensor's bytes as a 1-D view, so any dtype travels (gloo and NCCL alike)."""
    flat = tensor.detach().reshape(-1)
    return (flat if flat.is_contiguous() else flat.contiguous()).view(torch.uint8)


def _prepare_layer(
    plan: LayerTransferPlan,
    weights: Sequence[Tensor],
    staging_device: torch.device | None,
) -> _PreparedLayer:
    """Decide which new rows need staging and allocate them.

    Staged: one row per expert received, and a local copy whose source slot is
    itself overwritten by the commit. Not staged, copied by the commit: a local
    copy from a slot the commit leaves alone, and the further destinations of a
    received expert. Each row is its own tensor: a freed row is reused by the
    allocator next time, where one big block would be fresh memory each time.
    """
    changing = {c.destination for c in plan.copies}
    destinations: list[int] = []
    local: list[tuple[int, int]] = []
    received: dict[int, int] = {}
    from_slots: list[tuple[int, int]] = []
    from_rows: list[tuple[int, int]] = []
    for copy in plan.copies:
        if copy.source_rank == plan.rank and copy.source_slot not in changing:
            from_slots.append((copy.destination, copy.source_slot))
        elif copy.source_rank == plan.rank:
            local.append((len(destinations), copy.source_slot))
            destinations.append(copy.destination)
        elif copy.expert in received:
            from_rows.append((copy.destination, received[copy.expert]))
        else:
            received[copy.expert] = len(destinations)
            destinations.append(copy.destination)
    rows = tuple(
        tuple(
            torch.empty(
                w.shape[1:],
                dtype=w.dtype,
                device=w.device if staging_device is None else staging_device,
            )
            for w in weights
        )
        for _ in destinations
    )
    staged = _StagedLayer(
        plan.layer, tuple(destinations), rows, tuple(from_slots), tuple(from_rows)
    )
    return _PreparedLayer(staged, tuple(local), received)


def _copy_local_rows(prepared: _PreparedLayer, weights: Sequence[Tensor]) -> None:
    """Stage the local copies whose source slot the commit overwrites."""
    for index, source in prepared.local:
        for row, w in zip(prepared.staged.rows[index], weights, strict=True):
            row.copy_(w[source])


class _ReceiveBuffer:
    """A flat byte buffer on the weights' device that a batch's received rows are carved from."""

    def __init__(self, size: int, device: torch.device) -> None:
        self._data = torch.empty(size, dtype=torch.uint8, device=device)
        self._cursor = 0

    def fits(self, size: int, device: torch.device) -> bool:
        return self._data.device == device and self._data.numel() >= size

    def rewind(self) -> None:
        """Start carving from the beginning (the previous batch's rows were copied out)."""
        self._cursor = 0

    def take(self, sizes: Sequence[int]) -> list[Tensor]:
        """Byte views for one received row of each weight tensor."""
        views: list[Tensor] = []
        for size in sizes:
            views.append(self._data[self._cursor : self._cursor + size])
            self._cursor += size
        return views


@attrs.define
class _Counters:
    sent: int = 0
    received: int = 0
    seconds: float = 0.0


# ----------------------------------------------------------------------------- the engine


@attrs.define
class _Exchange:
    """One call of :func:`exchange_expert_weights` on one rank."""

    jobs: Sequence[TransferJob]
    ep: ExpertParallelContext
    options: TransferOptions
    device: torch.device | str
    steps: list[_Step]
    prepared: dict[int, _PreparedLayer] = attrs.field(factory=dict[int, _PreparedLayer])
    counters: list[_Counters] = attrs.field(factory=list[_Counters])
    failure: tuple[int, BaseException] | None = None
    buffer: _ReceiveBuffer | None = None

    def where(self, step: int) -> tuple[str, int | None]:
        """``("at MoE layer 2 of model 'model'", 2)`` for ``step``."""
        if step < len(self.steps):
            s = self.steps[step]
            return f"at MoE layer {s.layer} of model {self.jobs[s.job].model_name!r}", s.layer
        return "in the commit vote", None

    def vote(self, before: int) -> None:
        """Agree on whether any rank failed so far; raise the same error everywhere if one did."""
        rank = self.ep.rank
        where, layer = self.where(before)
        verdict = run_phase(
            self.ep,
            "commit vote" if before >= len(self.steps) else "exchange",
            f"agreeing {where} whether every rank staged its rows",
            lambda wait: agree(
                self.ep,
                failed_at=None if self.failure is None else self.failure[0],
                device=self.device,
                wait=wait,
            ),
            device=self.device,
            hook=self.options.phase_hook,
            layer=layer,
        )
        if verdict.failed_at is None:
            return
        where, layer = self.where(verdict.failed_at)
        own, cause = "", None
        if self.failure is not None:
            cause = self.failure[1]
            own = f"; on this rank: {type(cause).__name__}: {cause}"
        raise TransferError(
            f"EPLB weight transfer failed on EP rank {verdict.failed_rank} {where}{own}. "
            f"EP rank {rank} discarded its staged weights and kept its old weights and maps; "
            "nothing was committed on any rank",
            rank=verdict.failed_rank,
            layer=layer,
        ) from cause

    def prepare(self, index: int) -> None:
        step = self.steps[index]
        weights = self.jobs[step.job].expert_weights[step.layer]
        plan = self.jobs[step.job].plan.layers[step.layer]
        self.prepared[index] = _prepare_layer(plan, weights, self.options.staging_device)
        if self.options.fault_hook is not None:
            self.options.fault_hook(self.ep.rank, step.layer)

    def send_and_receive(self, batch: _Batch, budget: int) -> None:
        """Post the batch, stage local copies while it is on the wire, wait, place the rows."""
        rank, ep = self.ep.rank, self.ep
        ops: list[dist.P2POp] = []
        buffered: list[tuple[_PreparedLayer, int, list[Tensor]]] = []
        job = self.jobs[self.steps[batch.first_step].job]
        counters = self.counters[self.steps[batch.first_step].job]
        if self.buffer is not None:
            self.buffer.rewind()
        for index, transfers in batch.parts:
            weights = job.expert_weights[self.steps[index].layer]
            prepared = self.prepared[index]
            for t in transfers:
                if t.source_rank == rank:
                    # Sends read the old weights, which nothing writes before the commit.
                    peer = ep.global_rank(t.destination_rank)
                    for w in weights:
                        row = _byte_row(w[t.source_slot])
                        ops.append(dist.P2POp(dist.isend, row, peer, ep.group))
                        counters.sent += row.numel()
                    continue
                if t.destination_rank != rank:
                    continue
                peer = ep.global_rank(t.source_rank)
                row_index = prepared.received[t.expert]
                if self.options.staging_device is None:
                    targets = [_byte_row(r) for r in prepared.staged.rows[row_index]]
                else:
                    device = weights[0].device
                    if self.buffer is None or not self.buffer.fits(budget, device):
                        self.buffer = _ReceiveBuffer(budget, device)
                    targets = self.buffer.take(row_bytes(weights))
                    buffered.append((prepared, row_index, targets))
                for target in targets:
                    ops.append(dist.P2POp(dist.irecv, target, peer, ep.group))
                    counters.received += target.numel()
        where, layer = self.where(batch.first_step)
        works = run_phase(
            ep,
            "exchange",
            f"posting the rows {where}",
            lambda _: dist.batch_isend_irecv(ops) if ops else [],
            device=self.device,
            hook=self.options.phase_hook,
            layer=layer,
        )
        for index in batch.new_steps:
            step = self.steps[index]
            _copy_local_rows(self.prepared[index], job.expert_weights[step.layer])
        run_phase(
            ep,
            "exchange",
            f"exchanging the rows {where}",
            lambda wait: wait.all(works),
            device=self.device,
            layer=layer,
        )
        for prepared, row_index, targets in buffered:
            for row, target in zip(prepared.staged.rows[row_index], targets, strict=True):
                _byte_row(row).copy_(target)

    def run(self) -> tuple[StagedTransfer, ...]:
        rank = self.ep.rank
        self.counters = [_Counters() for _ in self.jobs]
        batches: list[_Batch] = []
        budgets: list[int] = []
        try:
            for job in self.jobs:
                if job.plan.rank != rank:
                    raise TransferError(
                        f"model {job.model_name!r}: plan is for EP rank {job.plan.rank}, this "
                        f"process is EP rank {rank}",
                        rank=rank,
                    )
                _check_weights(job.plan, job.expert_weights)
                budgets.append(receive_budget(job.expert_weights, self.options))
            batches = _plan_batches(self.steps, self.jobs, budgets)
        except Exception as exc:
            self.failure = (0, exc)
            self.vote(0)
        with torch.no_grad():
            for batch in batches:
                started = time.perf_counter()
                owner = self.steps[batch.first_step].job
                for index in batch.new_steps:
                    if self.failure is None:
                        try:
                            self.prepare(index)
                        except Exception as exc:
                            self.failure = (index, exc)
                self.vote(batch.first_step)
                try:
                    self.send_and_receive(batch, budgets[owner])
                except TransferTimeoutError:
                    raise  # the group broke: no vote can follow
                except Exception as exc:
                    self.failure = (batch.first_step, exc)
                self.counters[owner].seconds += time.perf_counter() - started
            self.vote(len(self.steps))
        return tuple(
            StagedTransfer(
                job.plan,
                job.expert_weights,
                tuple(
                    self.prepared[index].staged
                    for index, step in enumerate(self.steps)
                    if step.job == j and job.plan.layers[step.layer].copies
                ),
                bytes_sent=self.counters[j].sent,
                bytes_received=self.counters[j].received,
                seconds=self.counters[j].seconds,
            )
            for j, job in enumerate(self.jobs)
        )


def exchange_expert_weights(
    jobs: Sequence[TransferJob],
    ep: ExpertParallelContext,
    *,
    options: TransferOptions = _DEFAULT_OPTIONS,
    device: torch.device | str = "cpu",
) -> tuple[StagedTransfer, ...]:
    """Stage every job's changed rows across the EP group; return them only if every rank did.

    A collective: every EP rank calls it with plans of the same maps, in the
    same order. ``device`` holds the small agreement tensors (CPU for gloo, the
    GPU for NCCL). On success every rank returns its staged transfers, one per
    job, for the caller to commit; nothing live has been written.

    Raises:
        TransferError: on every rank when any rank failed to stage (``rank`` and
            ``layer`` name the first failure; on the failing rank ``__cause__``
            is its exception). No rank has written anything: all keep their old
            weights.
        TransferTimeoutError: (a ``TransferError``) on every rank that arrived,
            when a rank did not arrive at an agreement or P2P wait before the
            deadline or its connection dropped: ``missing_ranks`` and ``rank``
            name it, ``phase`` is ``"exchange"`` or ``"commit vote"``, ``layer``
            the first layer of the batch this rank stopped at. Nothing written.
    """
    steps = [_Step(j, layer.layer) for j, job in enumerate(jobs) for layer in job.plan.layers]
    return _Exchange(jobs, ep, options, device, steps).run()
