"""Moving expert weights from one placement to another, all or nothing.

Two steps, so that a multi-rank version only has to fill in the network part:

1. :func:`plan_transfer` compares the old and new ``physical_to_logical_map
   [layers, physical]`` and says, per layer, which local slots of this rank get
   a different logical expert and where each one comes from: a local slot that
   holds the expert in the *old* placement (a local copy), or another EP rank
   (a receive). It also lists what this rank must send to the others. Slots
   whose expert does not change are never touched. The choice of source is a
   pure function of the two maps, so every rank computes the same plan.
2. :func:`stage_transfer` reads every row it needs from the *old* weights into
   fresh buffers, layer by layer; nothing live is written. Only when every layer
   staged does :meth:`StagedTransfer.commit` write the buffers into the live
   weights. An error while staging leaves the weights untouched and names the
   layer. :func:`apply_transfer` does both.

Cross-rank sends and receives are not implemented yet: a plan that needs one is
rejected with a :class:`~moe_protocols.errors.TransferError` before anything is
read. With one EP rank every expert is local, so this never happens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import torch
from torch import Tensor

from moe_protocols.errors import TransferError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "ExpertCopy",
    "ExpertSend",
    "LayerTransferPlan",
    "StagedTransfer",
    "TransferPlan",
    "TransferStats",
    "apply_transfer",
    "plan_transfer",
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
class LayerTransferPlan:
    """What one MoE layer needs on one rank."""

    layer: int
    """MoE layer index."""
    rank: int
    """EP rank whose slots ``copies`` fill."""
    copies: tuple[ExpertCopy, ...]
    """Changed local slots, ascending by destination."""
    sends: tuple[ExpertSend, ...]
    """Experts other ranks receive from this rank."""

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
        """Whether every new expert is already on this rank (no network traffic)."""
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


def _check_maps(old_map: Tensor, new_map: Tensor, num_local: int, rank: int) -> int:
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
    return num_ranks


def _plan_layer(
    layer: int, old: list[int], new: list[int], num_local: int, num_ranks: int, rank: int
) -> LayerTransferPlan:
    # First slot (local index) of each (rank, expert) in the old placement, and
    # the ranks holding each expert in ascending order.
    first_slot: dict[tuple[int, int], int] = {}
    holders: dict[int, list[int]] = {}
    for slot, expert in enumerate(old):
        if expert < 0:
            continue
        owner = slot // num_local
        if (owner, expert) not in first_slot:
            first_slot[owner, expert] = slot % num_local
            holders.setdefault(expert, []).append(owner)

    def source_of(receiver: int, expert: int) -> tuple[int, int]:
        if (receiver, expert) in first_slot:
            return receiver, first_slot[receiver, expert]
        ranks = holders.get(expert)
        if not ranks:
            raise TransferError(
                f"plan_transfer: layer {layer}: logical expert {expert} is needed but no slot "
                "holds it in the old placement",
                rank=rank,
                layer=layer,
            )
        # Spread receivers over the holders so no single rank sends everything.
        holder = ranks[receiver % len(ranks)]
        return holder, first_slot[holder, expert]

    copies: list[ExpertCopy] = []
    sends: list[ExpertSend] = []
    sent: set[tuple[int, int]] = set()
    for slot, (before, after) in enumerate(zip(old, new, strict=True)):
        if after == before or after < 0:
            continue
        receiver = slot // num_local
        if receiver != rank and (receiver, after) in first_slot:
            continue  # the receiver copies it locally; no traffic involves this rank
        source_rank, source_slot = source_of(receiver, after)
        if receiver == rank:
            copies.append(ExpertCopy(after, slot % num_local, source_rank, source_slot))
        elif source_rank == rank and (receiver, after) not in sent:
            # One send per (receiver, expert): duplicates on the receiver copy from it.
            sent.add((receiver, after))
            sends.append(ExpertSend(after, source_slot, receiver))
    return LayerTransferPlan(layer, rank, tuple(copies), tuple(sends))


def plan_transfer(old_map: Tensor, new_map: Tensor, num_local: int, rank: int) -> TransferPlan:
    """Plan the move from ``old_map`` to ``new_map`` (both ``[layers, physical]``) for one rank.

    Args:
        old_map: placement the live weights are in now.
        new_map: placement to move to; ``-1`` (empty slot) needs nothing.
        num_local: physical slots per rank; slot ``p`` lives on rank ``p // num_local``.
        rank: the EP rank to plan for.

    Returns:
        A :class:`TransferPlan`: per layer, each local slot whose expert changes with
        its source (a local slot holding that expert in the old map when there is
        one, else a rank holding it), and the sends this rank owes other ranks.
        Several destinations of one expert share one source.

    Raises:
        TransferError: maps of different shapes, slots that do not split into
            ranks, a rank out of range, or an expert the new map needs that no
            slot holds in the old map.
    """
    num_ranks = _check_maps(old_map, new_map, num_local, rank)
    old_rows = old_map.detach().to("cpu", torch.int64).tolist()
    new_rows = new_map.detach().to("cpu", torch.int64).tolist()
    layers = tuple(
        _plan_layer(layer, old, new, num_local, num_ranks, rank)
        for layer, (old, new) in enumerate(zip(old_rows, new_rows, strict=True))
    )
    return TransferPlan(rank, num_ranks, num_local, layers)


@attrs.frozen(eq=False)
class _StagedLayer:
    layer: int
    destinations: Tensor
    rows: tuple[Tensor, ...]


def _stage_layer(plan: LayerTransferPlan, weights: Sequence[Tensor]) -> _StagedLayer:
    """Copy the rows ``plan`` needs out of the old weights of one layer (reads only)."""
    destinations = torch.tensor([c.destination for c in plan.copies], dtype=torch.int64)
    sources = torch.tensor([c.source_slot for c in plan.copies], dtype=torch.int64)
    # index_select returns new storage, so later writes to the live weights
    # cannot change what was staged, even when a slot is both source and destination.
    rows = tuple(w.index_select(0, sources.to(w.device)) for w in weights)
    return _StagedLayer(plan.layer, destinations, rows)


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
    """Every changed row of every layer, read from the old weights; commit writes them."""

    plan: TransferPlan
    expert_weights: Sequence[Sequence[Tensor]]
    _layers: tuple[_StagedLayer, ...]

    @property
    def bytes_staged(self) -> int:
        """Bytes held in the staging buffers (= bytes the commit writes)."""
        return sum(r.numel() * r.element_size() for s in self._layers for r in s.rows)

    def commit(self) -> TransferStats:
        """Write the staged rows into the live weights; returns what was moved.

        The writes are plain in-place copies of buffers whose shapes, dtypes and
        devices were fixed while staging.
        """
        with torch.no_grad():
            for staged in self._layers:
                for w, rows in zip(self.expert_weights[staged.layer], staged.rows, strict=True):
                    w.index_copy_(0, staged.destinations.to(w.device), rows)
        return TransferStats(
            slots_changed=self.plan.slots_changed,
            bytes_moved=self.bytes_staged,
            layers_changed=len(self._layers),
        )


def stage_transfer(
    plan: TransferPlan, expert_weights: Sequence[Sequence[Tensor]]
) -> StagedTransfer:
    """Read every row the plan needs from the old weights; nothing live is written.

    Raises:
        TransferError: the weights do not match the plan, the plan needs another
            rank (not supported in-process yet), or staging a layer failed
            (``layer`` says which). The weights are untouched in every case.
    """
    _check_weights(plan, expert_weights)
    for layer_plan in plan.layers:
        if layer_plan.sends or layer_plan.remote_copies:
            raise TransferError(
                f"layer {layer_plan.layer}: the plan moves experts between EP ranks, which is "
                "not supported in-process yet (only local copies are)",
                rank=plan.rank,
                layer=layer_plan.layer,
            )
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
    return StagedTransfer(plan, expert_weights, tuple(staged))


def apply_transfer(plan: TransferPlan, expert_weights: Sequence[Sequence[Tensor]]) -> TransferStats:
    """Move the weights as ``plan`` says: stage every layer, then commit all of them.

    ``expert_weights[layer][k]`` is ``[num_local, ...]`` and is written in place.
    On any error before the commit the weights are unchanged and a
    :class:`~moe_protocols.errors.TransferError` names the rank and layer.
    """
    return stage_transfer(plan, expert_weights).commit()
