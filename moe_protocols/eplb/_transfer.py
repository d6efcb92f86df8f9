"""Moving expert weights from one placement to another, all or nothing.

Two steps:

1. :func:`plan_transfer` compares the old and new ``physical_to_logical_map
   [layers, physical]`` and says, per layer, which local slots of this rank get
   a different logical expert and where each one comes from: a local slot that
   holds the expert in the *old* placement (a local copy, always preferred), or
   another EP rank (a receive). It also lists, for the whole EP group, every
   expert row that crosses ranks (:class:`ExpertTransfer`): exactly one per
   (receiving rank, expert) the rank lacks, which is the minimum the new
   placement needs (:func:`remote_fetches_required`). Senders are chosen to be
   near (same node first) and to spread the sending over the holders. Slots
   whose expert does not change are never touched. The plan is a pure function
   of the two maps, so every rank computes the same one.
2. :func:`stage_transfer` reads every row it needs from the *old* weights into
   fresh buffers, layer by layer; nothing live is written. Only when every layer
   staged does :meth:`StagedTransfer.commit` write the buffers into the live
   weights. An error while staging leaves the weights untouched and names the
   layer. :func:`apply_transfer` does both.

In one process every expert is local. A plan that moves experts between EP
ranks is staged by :func:`moe_protocols.eplb.exchange_expert_weights` over
``torch.distributed`` (``_distributed.py``); :func:`stage_transfer` rejects it
with a :class:`~moe_protocols.errors.TransferError` before anything is read.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import attrs
import torch
from torch import Tensor

from moe_protocols._torch_typed import int_rows
from moe_protocols.errors import TransferError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "ExpertCopy",
    "ExpertSend",
    "ExpertTransfer",
    "LayerTransferPlan",
    "StagedTransfer",
    "TransferPlan",
    "TransferStats",
    "apply_transfer",
    "plan_transfer",
    "remote_fetches_required",
    "stage_transfer",
]


@attrs.frozen
class ExpertCopy:
    """One local slot of this rank that receives a logical expert."""

    expert: int
    """Logical expert the slot holds in the new placement."""
    destination: int
    """Local slot index (``0 <= destination < num_local``) on this rank."""
    source_rank: int
    """EP rank holding the expert in the old placement (this rank for a local copy)."""
    source_slot: int
    """Local slot index on ``source_rank`` holding the expert in the old placement."""


@attrs.frozen
class ExpertSend:
    """One expert this rank sends to another rank (whose local slots lack it)."""

    expert: int
    """Logical expert sent."""
    source_slot: int
    """Local slot of this rank holding the expert in the old placement."""
    destination_rank: int
    """EP rank receiving it (once, however many of its slots need the expert)."""


@attrs.frozen
class ExpertTransfer:
    """One expert row that crosses ranks: sent once, however many slots of the receiver need it."""

    expert: int
    """Logical expert sent."""
    source_rank: int
    """EP rank sending it (holds it in the old placement)."""
    source_slot: int
    """Local slot on ``source_rank`` the row is read from (in the old placement)."""
    destination_rank: int
    """EP rank receiving it (lacks it in the old placement)."""


@attrs.frozen
class LayerTransferPlan:
    """What one MoE layer needs on one rank, and every row crossing ranks in that layer."""

    layer: int
    """MoE layer index."""
    rank: int
    """EP rank whose slots ``copies`` fill."""
    copies: tuple[ExpertCopy, ...]
    """Changed local slots, ascending by destination."""
    transfers: tuple[ExpertTransfer, ...]
    """Every row crossing ranks in this layer, over the whole EP group, in wire order:
    sorted by ``(destination_rank, expert)``. Every rank plans the same tuple."""

    @property
    def sends(self) -> tuple[ExpertSend, ...]:
        """Experts other ranks receive from this rank (one per receiving rank and expert)."""
        return tuple(
            ExpertSend(t.expert, t.source_slot, t.destination_rank)
            for t in self.transfers
            if t.source_rank == self.rank
        )

    @property
    def receives(self) -> tuple[ExpertTransfer, ...]:
        """Rows this rank receives (one per expert it lacks; duplicates are copied locally)."""
        return tuple(t for t in self.transfers if t.destination_rank == self.rank)

    @property
    def local_copies(self) -> tuple[ExpertCopy, ...]:
        """Copies whose source is a slot on this rank."""
        return tuple(c for c in self.copies if c.source_rank == self.rank)

    @property
    def remote_copies(self) -> tuple[ExpertCopy, ...]:
        """Copies whose source is another rank (a receive)."""
        return tuple(c for c in self.copies if c.source_rank != self.rank)


@attrs.frozen
class TransferPlan:
    """Per layer, the local slots of one rank that change and where each new expert comes from."""

    rank: int
    """EP rank this plan is for."""
    num_ranks: int
    """EP ranks the physical slots are spread over (rank-major)."""
    num_local_physical_experts: int
    """Slots per rank."""
    layers: tuple[LayerTransferPlan, ...]
    """One entry per MoE layer, in layer order (layers without changes have no copies)."""

    @property
    def num_layers(self) -> int:
        """MoE layers covered by the plan."""
        return len(self.layers)

    @property
    def slots_changed(self) -> int:
        """Local slots of this rank that receive a different expert."""
        return sum(len(layer.copies) for layer in self.layers)

    @property
    def is_local_only(self) -> bool:
        """Whether this rank neither sends nor receives (every new expert is already here)."""
        return all(not layer.sends and not layer.remote_copies for layer in self.layers)


@attrs.frozen
class TransferStats:
    """What a committed transfer did on this rank."""

    slots_changed: int
    """Local slots whose logical expert changed (and were rewritten)."""
    bytes_moved: int
    """Bytes written into this rank's expert weights."""
    layers_changed: int
    """MoE layers with at least one changed slot."""
    bytes_sent: int = 0
    """Bytes this rank sent to other EP ranks (0 in one process)."""
    bytes_received: int = 0
    """Bytes this rank received from other EP ranks (0 in one process)."""


def _check_maps(
    old_map: Tensor, new_map: Tensor, num_local: int, rank: int, num_nodes: int = 1
) -> int:
    for name, value in (("old_map", old_map), ("new_map", new_map)):
        if value.dim() != 2:
            raise TransferError(
                f"plan_transfer: {name} must be [layers, physical], got shape {tuple(value.shape)}",
                rank=rank,
            )
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TransferError(
                f"plan_transfer: {name} must hold integer expert ids, got dtype {value.dtype}",
                rank=rank,
            )
    if old_map.shape != new_map.shape:
        raise TransferError(
            f"plan_transfer: old_map {tuple(old_map.shape)} and new_map {tuple(new_map.shape)} "
            "differ in shape",
            rank=rank,
        )
    num_physical = old_map.shape[1]
    if num_local < 1 or num_physical % num_local != 0:
        raise TransferError(
            f"plan_transfer: {num_physical} physical slots do not split into ranks of "
            f"num_local={num_local} slots",
            rank=rank,
        )
    num_ranks = num_physical // num_local
    if not 0 <= rank < num_ranks:
        raise TransferError(f"plan_transfer: rank {rank} outside [0, {num_ranks})", rank=rank)
    if num_nodes < 1 or num_ranks % num_nodes != 0:
        raise TransferError(
            f"plan_transfer: num_nodes={num_nodes} must be >= 1 and divide the {num_ranks} "
            "EP ranks",
            rank=rank,
        )
    return num_ranks


def _plan_layer(
    layer: int,
    old: list[int],
    new: list[int],
    num_local: int,
    num_ranks: int,
    rank: int,
    ranks_per_node: int,
) -> LayerTransferPlan:
    # First slot (local index) of each (rank, expert) in the old placement, and
    # the ranks holding each expert, ascending.
    first_slot: dict[tuple[int, int], int] = {}
    holders: dict[int, list[int]] = {}
    for slot, expert in enumerate(old):
        if expert < 0:
            continue
        owner = slot // num_local
        if (owner, expert) not in first_slot:
            first_slot[owner, expert] = slot % num_local
            holders.setdefault(expert, []).append(owner)

    # Group-wide: each (expert, receiver) where a changed slot needs an expert
    # its rank lacks. One row crosses per pair, the minimum the placement needs.
    needs = sorted(
        {
            (after, slot // num_local)
            for slot, (before, after) in enumerate(zip(old, new, strict=True))
            if after != before and after >= 0 and (slot // num_local, after) not in first_slot
        }
    )
    sender_of: dict[tuple[int, int], int] = {}
    rows_sent = [0] * num_ranks
    for expert, receiver in needs:
        ranks = holders.get(expert)
        if not ranks:
            raise TransferError(
                f"plan_transfer: layer {layer}: logical expert {expert} is needed but no slot "
                "holds it in the old placement",
                rank=rank,
                layer=layer,
            )
        # Nearest first (a holder on the receiver's node), then the holder that
        # sends least so far; ties go to the next rank round the ring from the
        # receiver, so receivers of one expert spread over its holders.
        node = receiver // ranks_per_node
        near = [h for h in ranks if h // ranks_per_node == node] or ranks
        holder = min(near, key=lambda h: (rows_sent[h], (h - receiver) % num_ranks))
        rows_sent[holder] += 1
        sender_of[receiver, expert] = holder
    transfers = tuple(
        ExpertTransfer(expert, holder, first_slot[holder, expert], receiver)
        for (receiver, expert), holder in sorted(sender_of.items())
    )

    copies: list[ExpertCopy] = []
    first = rank * num_local
    for local in range(num_local):
        before, after = old[first + local], new[first + local]
        if after == before or after < 0:
            continue
        source_rank = rank if (rank, after) in first_slot else sender_of[rank, after]
        copies.append(ExpertCopy(after, local, source_rank, first_slot[source_rank, after]))
    return LayerTransferPlan(layer, rank, tuple(copies), transfers)


def plan_transfer(
    old_map: Tensor, new_map: Tensor, num_local: int, rank: int, *, num_nodes: int = 1
) -> TransferPlan:
    """Plan the move from ``old_map`` to ``new_map`` (both ``[layers, physical]``) for one rank.

    Args:
        old_map: placement the live weights are in now (``-1`` = empty slot).
        new_map: placement to move to; ``-1`` (empty slot) needs nothing.
        num_local: physical slots per rank; slot ``p`` lives on rank ``p // num_local``.
        rank: the EP rank to plan for.
        num_nodes: nodes the EP ranks are spread over (node-major); a sender on
            the receiver's node is preferred.

    Returns:
        A :class:`TransferPlan`: per layer, each local slot whose expert changes with
        its source (a local slot holding that expert in the old map when there is
        one, else the rank sending it), and every row crossing ranks in the group.
        Several destinations of one expert on one rank share one source.

    Raises:
        TransferError: maps of different shapes, slots that do not split into
            ranks or ranks into nodes, a rank out of range, or an expert the new
            map needs that no slot holds in the old map.
    """
    num_ranks = _check_maps(old_map, new_map, num_local, rank, num_nodes)
    old_rows = int_rows(old_map.detach().to("cpu", torch.int64))
    new_rows = int_rows(new_map.detach().to("cpu", torch.int64))
    layers = tuple(
        _plan_layer(layer, old, new, num_local, num_ranks, rank, num_ranks // num_nodes)
        for layer, (old, new) in enumerate(zip(old_rows, new_rows, strict=True))
    )
    return TransferPlan(rank, num_ranks, num_local, layers)


def remote_fetches_required(old_map: Tensor, new_map: Tensor, num_local: int) -> int:
    """The fewest expert rows that must cross ranks to go from ``old_map`` to ``new_map``.

    One per ``(layer, rank, expert)`` where the rank holds the expert in the new
    placement and in none of its slots in the old one; every other changed slot
    can be filled by a local copy. Multiply by the bytes of one expert row (all
    weight tensors of a slot) for the minimum bytes a transfer must send.

    Raises:
        TransferError: the maps differ in shape or their slots do not split into
            ranks of ``num_local``.
    """
    _check_maps(old_map, new_map, num_local, 0)
    old = int_rows(old_map.detach().to("cpu", torch.int64))
    new = int_rows(new_map.detach().to("cpu", torch.int64))
    total = 0
    for old_row, new_row in zip(old, new, strict=True):
        for first in range(0, len(old_row), num_local):
            had = set(old_row[first : first + num_local])
            total += len({e for e in new_row[first : first + num_local] if e >= 0} - had)
    return total


@attrs.frozen(eq=False)
class _StagedLayer:
    """What the commit writes into one layer.

    ``rows[i][k]`` goes to slot ``destinations[i]`` of weight ``k``; then each
    ``(destination, source)`` of ``from_slots`` copies a slot that the commit
    does not write (so it still holds its old expert), and each of
    ``from_rows`` copies staged row ``source`` (a duplicate of a received expert).
    """

    layer: int
    destinations: tuple[int, ...]
    rows: tuple[tuple[Tensor, ...], ...]
    from_slots: tuple[tuple[int, int], ...] = ()
    from_rows: tuple[tuple[int, int], ...] = ()
    stacked: tuple[Tensor, ...] | None = None
    """Per weight tensor, ``rows`` as one ``[len(destinations), ...]`` tensor when they were
    staged that way (``rows`` are then views of it), so they can be checked in one go."""

    @property
    def written_slots(self) -> tuple[int, ...]:
        """Every local slot the commit writes, in the order it writes them."""
        return (
            *self.destinations,
            *(d for d, _ in self.from_slots),
            *(d for d, _ in self.from_rows),
        )

    @property
    def nbytes(self) -> int:
        """Bytes held in staging rows."""
        return sum(r.numel() * r.element_size() for row in self.rows for r in row)

    def written(self, weights: Sequence[Tensor]) -> int:
        """Bytes the commit writes into ``weights``."""
        row = sum((w.numel() // max(w.shape[0], 1)) * w.element_size() for w in weights)
        return row * (len(self.destinations) + len(self.from_slots) + len(self.from_rows))

    def commit(self, weights: Sequence[Tensor]) -> None:
        """Write this layer's new rows into ``weights`` (in place, under ``no_grad``)."""
        for destination, row in zip(self.destinations, self.rows, strict=True):
            for w, new in zip(weights, row, strict=True):
                # copy_ also moves rows staged on another device (e.g. host memory).
                w[destination].copy_(new)
        for destination, slot in self.from_slots:
            for w in weights:
                w[destination].copy_(w[slot])
        for destination, index in self.from_rows:
            for w, new in zip(weights, self.rows[index], strict=True):
                w[destination].copy_(new)


def _stage_layer(plan: LayerTransferPlan, weights: Sequence[Tensor]) -> _StagedLayer:
    """Copy the rows ``plan`` needs out of the old weights of one layer (reads only)."""
    sources = torch.tensor([c.source_slot for c in plan.copies], dtype=torch.int64)
    # index_select returns new storage, so later writes to the live weights
    # cannot change what was staged, even when a slot is both source and destination.
    stacked = tuple(w.index_select(0, sources.to(w.device)) for w in weights)
    rows = tuple(zip(*(t.unbind(0) for t in stacked), strict=True))
    return _StagedLayer(
        plan.layer, tuple(c.destination for c in plan.copies), rows, stacked=stacked
    )


def _check_weights(plan: TransferPlan, expert_weights: Sequence[Sequence[Tensor]]) -> None:
    if len(expert_weights) != plan.num_layers:
        raise TransferError(
            f"expert_weights has {len(expert_weights)} layers, the plan covers {plan.num_layers}",
            rank=plan.rank,
        )
    for layer, weights in enumerate(expert_weights):
        for k, w in enumerate(weights):
            if w.dim() < 1 or w.shape[0] != plan.num_local_physical_experts:
                raise TransferError(
                    f"expert_weights[{layer}][{k}] has shape {tuple(w.shape)}; dim 0 must be "
                    f"the {plan.num_local_physical_experts} local expert slots",
                    rank=plan.rank,
                    layer=layer,
                )


@attrs.frozen(eq=False)
class StagedTransfer:
    """Every changed row of every layer, read or received; commit writes them into the weights.

    Built by :func:`stage_transfer` (one process) or
    :func:`~moe_protocols.eplb.exchange_expert_weights` (across ranks, only
    once every rank staged successfully).
    """

    plan: TransferPlan
    expert_weights: Sequence[Sequence[Tensor]]
    _layers: tuple[_StagedLayer, ...]
    bytes_sent: int = 0
    """Bytes this rank sent to other ranks while staging."""
    bytes_received: int = 0
    """Bytes this rank received from other ranks while staging."""
    seconds: float = 0.0
    """Wall time spent staging (reading, sending, receiving) on this rank."""

    @property
    def layers(self) -> tuple[_StagedLayer, ...]:
        """What the commit writes, per changed layer."""
        return self._layers

    @property
    def bytes_staged(self) -> int:
        """Bytes held in the staging rows until the commit."""
        return sum(staged.nbytes for staged in self._layers)

    @property
    def bytes_written(self) -> int:
        """Bytes the commit writes into the live weights (every changed slot)."""
        return sum(s.written(self.expert_weights[s.layer]) for s in self._layers)

    def commit(self) -> TransferStats:
        """Write the staged rows into the live weights; returns what was moved.

        The writes are plain in-place copies of buffers whose shapes, dtypes and
        devices were fixed while staging.
        """
        with torch.no_grad():
            for staged in self._layers:
                staged.commit(self.expert_weights[staged.layer])
        return TransferStats(
            slots_changed=self.plan.slots_changed,
            bytes_moved=self.bytes_written,
            layers_changed=len(self._layers),
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
        )


def stage_transfer(
    plan: TransferPlan, expert_weights: Sequence[Sequence[Tensor]]
) -> StagedTransfer:
    """Read every row the plan needs from the old weights; nothing live is written.

    Raises:
        TransferError: the weights do not match the plan, the plan needs another
            rank (not supported in-process: use ``exchange_expert_weights`` in an
            EP process group), or staging a layer failed (``layer`` says which).
            The weights are untouched in every case.
    """
    _check_weights(plan, expert_weights)
    for layer_plan in plan.layers:
        if layer_plan.sends or layer_plan.remote_copies:
            raise TransferError(
                f"layer {layer_plan.layer}: the plan moves experts between EP ranks, which is "
                "not supported in-process (only local copies are); stage it with "
                "exchange_expert_weights in an EP process group",
                rank=plan.rank,
                layer=layer_plan.layer,
            )
    started = time.perf_counter()
    staged: list[_StagedLayer] = []
    with torch.no_grad():
        for layer_plan in plan.layers:
            if not layer_plan.copies:
                continue
            try:
                staged.append(_stage_layer(layer_plan, expert_weights[layer_plan.layer]))
            except Exception as exc:
                raise TransferError(
                    f"staging layer {layer_plan.layer} on rank {plan.rank} failed, nothing was "
                    f"written: {type(exc).__name__}: {exc}",
                    rank=plan.rank,
                    layer=layer_plan.layer,
                ) from exc
    return StagedTransfer(
        plan, expert_weights, tuple(staged), seconds=time.perf_counter() - started
    )


def apply_transfer(plan: TransferPlan, expert_weights: Sequence[Sequence[Tensor]]) -> TransferStats:
    """Move the weights as ``plan`` says: stage every layer, then commit all of them.

    ``expert_weights[layer][k]`` is ``[num_local, ...]`` and is written in place.
    On any error before the commit the weights are unchanged and a
    :class:`~moe_protocols.errors.TransferError` names the rank and layer.
    """
    return stage_transfer(plan, expert_weights).commit()
