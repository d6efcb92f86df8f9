"""Checks that every slot holds the bytes of its logical expert, before and after each move.

``EplbState`` keeps, per registered model, a ``[L, E]`` table of each logical
expert's fingerprint (:func:`~moe_protocols.eplb._fingerprint.row_digests`),
taken when the model is first balanced. The weights of an expert never change
while it is served; only where it lives does, so the table stays valid through
every move and the expected fingerprint of a slot is that of the expert the
map says it holds. Around each commit:

1. the rows staged for the commit are fingerprinted and compared with the
   expert each destination slot is to hold (a wrong or torn row is refused
   before any live byte changes);
2. the rows the commit will overwrite are kept, the commit runs, and the
   written slots are fingerprinted again (a write that landed elsewhere, e.g.
   into an aliased view, is caught); on a mismatch the kept rows are written
   back, so nothing is committed.

In ``"full"`` mode, step 2 also re-reads every local slot of every changed
layer. When the table is built, every replica must match its expert: a
redundant slot that was never a copy of its expert is refused, naming the EP
rank that holds it.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Final

import attrs
import torch
from torch import Tensor

from moe_protocols._torch_typed import int_list
from moe_protocols.errors import EplbStateError, TransferError

from ._fingerprint import IntegrityMode, row_digests

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._transfer import StagedTransfer

__all__ = [
    "UndoRows",
    "aliasing_problem",
    "build_table",
    "check_staged",
    "check_writable",
    "check_written",
    "slot_digests",
]


def _overlaps_itself(tensor: Tensor) -> bool:
    """Whether two elements of ``tensor`` share memory (strides that fold back, or 0)."""
    dims = sorted(
        (
            (stride, size)
            for stride, size in zip(tensor.stride(), tensor.shape, strict=True)
            if size > 1
        ),
        reverse=True,
    )
    for (stride, _), (inner_stride, inner_size) in itertools.pairwise(dims):
        if stride < inner_stride * inner_size:
            return True
    return any(stride == 0 for stride, _ in dims)


_EXACT_CHECK_ELEMENTS: Final = 1 << 25
"""Largest row (in elements) whose memory the exact overlap check enumerates; past it,
two tensors whose spans interleave are assumed not to share elements (the check after
every commit would still catch a write that changed a neighbour)."""


def _offsets(tensor: Tensor) -> Tensor:
    """Sorted element offsets of ``tensor`` from its first element, in elements (int64 CPU)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
        offsets = (offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride).flatten()
    return offsets.sort().values


def _share_elements(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors whose byte spans overlap really share an element."""
    size = a.element_size()
    delta = b.data_ptr() - a.data_ptr()
    if b.element_size() != size or delta % size != 0:
        return True  # elements that straddle each other: no exact answer, refuse
    delta //= size
    if a.dim() == 0 or b.dim() == 0 or a.shape[0] != b.shape[0] or a.stride(0) != b.stride(0):
        if max(a.numel(), b.numel()) > _EXACT_CHECK_ELEMENTS:
            return False
        return bool(torch.isin(_offsets(b) + delta, _offsets(a)).any())
    # Same slot stride: row i of a meets row j of b only where offsets differ by (j - i) * stride.
    if max(a[0].numel(), b[0].numel()) > _EXACT_CHECK_ELEMENTS:
        return False
    rows_a, rows_b = _offsets(a[0]), _offsets(b[0])
    stride, slots = a.stride(0), a.shape[0]
    low, high = -int(rows_b[-1]), int(rows_a[-1])
    for shift in range(-(slots - 1), slots):
        offset = delta + shift * stride
        if low <= offset <= high and bool(torch.isin(rows_b + offset, rows_a).any()):
            return True
    return False


def aliasing_problem(expert_weights: Sequence[Sequence[Tensor]]) -> str | None:
    """Why the expert weights cannot be written slot by slot safely, or ``None``.

    Refused: a tensor whose elements share memory (an ``expand``-ed or
    overlapping ``as_strided`` view) and two tensors that share an element
    (one weight used twice, or overlapping views into one buffer). Views that
    interleave without sharing an element (the gate and up halves of one
    fused weight) are fine.
    """
    spans: list[tuple[int, int, str, Tensor]] = []
    for layer, tensors in enumerate(expert_weights):
        for k, tensor in enumerate(tensors):
            where = f"expert_weights[{layer}][{k}]"
            if tensor.numel() == 0:
                continue
            if _overlaps_itself(tensor):
                return f"{where} (strides {tensor.stride()}) has slots that share memory"
            start = tensor.data_ptr()
            last = sum((n - 1) * st for n, st in zip(tensor.shape, tensor.stride(), strict=True))
            spans.append((start, start + (last + 1) * tensor.element_size(), where, tensor))
    spans.sort(key=lambda span: span[0])
    active: list[tuple[int, int, str, Tensor]] = []
    for span in spans:
        active = [other for other in active if other[1] > span[0]]
        for other in active:
            if _share_elements(other[3], span[3]):
                return f"{other[2]} and {span[2]} share memory"
        active.append(span)
    return None


def slot_digests(expert_weights: Sequence[Sequence[Tensor]], mode: IntegrityMode) -> Tensor:
    """``[L, P_local]`` int64 fingerprints of every local slot of every layer."""
    return torch.stack([row_digests(weights, mode=mode) for weights in expert_weights])


def build_table(
    model_name: str,
    digests: Tensor,
    physical_to_logical_map: Tensor,
    num_logical: int,
    num_local: int,
) -> Tensor:
    """``[L, E]`` expert fingerprints from every slot's ``[L, P]`` ones (all ranks).

    Raises:
        EplbStateError: two slots of one expert hold different bytes (the
            message names the layer, both slots, the expert and the EP ranks).
    """
    p2l = physical_to_logical_map.to("cpu", torch.int64)
    num_layers, num_physical = p2l.shape
    # The lowest slot of each expert is its reference.
    slots = torch.arange(num_physical).expand(num_layers, -1)
    first = torch.full((num_layers, num_logical), num_physical, dtype=torch.int64)
    first.scatter_reduce_(1, p2l.clamp(min=0), torch.where(p2l >= 0, slots, num_physical), "amin")
    table = digests.gather(1, first.clamp(max=num_physical - 1))
    expected = table.gather(1, p2l.clamp(min=0))
    wrong = (expected != digests) & (p2l >= 0)
    if bool(wrong.any()):
        layer, slot = (int(i) for i in wrong.nonzero()[0])
        expert = int(p2l[layer, slot])
        reference = int(first[layer, expert])
        raise EplbStateError(
            f"model {model_name!r}: MoE layer {layer}, slot {slot} (EP rank "
            f"{slot // num_local}) should hold logical expert {expert} but its weights differ "
            f"from slot {reference} (EP rank {reference // num_local}), which holds the same "
            f"expert ({int(wrong.sum())} slots differ in all). Redundant slots must start as "
            "exact copies of their expert's weights, and every rank must hold the same "
            "weights for the same expert; nothing was balanced"
        )
    return table


def _expected(
    table: Tensor, new_map: Tensor, layer: int, slots: Sequence[int], first_slot: int
) -> Tensor:
    physical = torch.tensor([first_slot + s for s in slots], dtype=torch.int64)
    return table[layer].gather(0, new_map[layer].gather(0, physical))


def check_staged(
    model_name: str,
    staged: StagedTransfer,
    table: Tensor,
    new_map: Tensor,
    mode: IntegrityMode,
) -> None:
    """Compare each staged row with the expert its destination is to hold.

    Raises:
        TransferError: a staged row is not its expert's (rank and layer named).
    """
    rank, num_local = staged.plan.rank, staged.plan.num_local_physical_experts
    for layer in staged.layers:
        if not layer.rows:
            continue
        if layer.stacked is not None:
            got = row_digests(layer.stacked, mode=mode)
        else:
            # One row at a time: stacking them would copy every staged byte once more.
            got = torch.cat(
                [row_digests([r.unsqueeze(0) for r in row], mode=mode) for row in layer.rows]
            )
        want = _expected(table, new_map, layer.layer, layer.destinations, rank * num_local)
        _raise_on_mismatch(
            model_name, "staged for", rank, layer.layer, layer.destinations, got, want
        )


def _raise_on_mismatch(
    model_name: str,
    what: str,
    rank: int,
    layer: int,
    slots: Sequence[int],
    got: Tensor,
    want: Tensor,
) -> None:
    wrong = (got != want).nonzero()
    if wrong.numel() == 0:
        return
    slot = slots[int(wrong[0, 0])]
    raise TransferError(
        f"model {model_name!r}: the row {what} local slot {slot} of MoE layer {layer} on EP "
        f"rank {rank} does not hold the bytes of the expert the new placement gives it "
        f"({wrong.shape[0]} such rows in this layer); nothing was committed",
        rank=rank,
        layer=layer,
    )


def check_writable(model_name: str, staged: StagedTransfer) -> None:
    """Refuse, before the commit, weights that an in-place copy cannot write.

    Raises:
        TransferError: an inference tensor outside inference mode, or a weight
            whose rows alias (rank and layer named).
    """
    inference_mode = torch.is_inference_mode_enabled()
    for layer in staged.layers:
        for k, weight in enumerate(staged.expert_weights[layer.layer]):
            problem = None
            if weight.is_inference() and not inference_mode:
                problem = (
                    "is an inference tensor (created under torch.inference_mode()), which "
                    "cannot be written in place outside it; create the model's weights "
                    "outside inference mode or rearrange inside it"
                )
            elif _overlaps_itself(weight):
                problem = f"(strides {weight.stride()}) has slots that share memory"
            if problem is not None:
                raise TransferError(
                    f"model {model_name!r}: expert_weights[{layer.layer}][{k}] {problem}; "
                    "nothing was committed",
                    rank=staged.plan.rank,
                    layer=layer.layer,
                )


@attrs.frozen(eq=False)
class UndoRows:
    """The old contents of the slots a commit overwrites, so a bad commit can be undone.

    Copied only where they would be lost: a written slot whose old expert is
    also staged (the source of a local copy: staged rows are never written
    by the commit) or still held by a local slot the commit does not touch is
    restored from there. Only the rest (an expert this rank drops entirely)
    is copied before the commit.
    """

    staged: StagedTransfer
    rows: tuple[tuple[tuple[int, ...], tuple[Tensor, ...]], ...]
    """Per staged layer: the copied slots and, per weight tensor, their old rows."""
    from_staged: tuple[tuple[tuple[int, int], ...], ...]
    """Per staged layer: ``(slot, staged row index)`` of slots whose old rows were staged."""
    from_slots: tuple[tuple[tuple[int, int], ...], ...]
    """Per staged layer: ``(slot, untouched slot)`` holding the same old expert."""

    @classmethod
    def capture(cls, staged: StagedTransfer, old_map: Tensor) -> UndoRows:
        """Keep what the commit of ``staged`` will overwrite; ``old_map`` is ``[L, P]`` before."""
        plans = {layer.layer: layer for layer in staged.plan.layers}
        local_only = staged.plan.is_local_only
        num_local = staged.plan.num_local_physical_experts
        first = staged.plan.rank * num_local
        kept: list[tuple[tuple[int, ...], tuple[Tensor, ...]]] = []
        reused: list[tuple[tuple[int, int], ...]] = []
        spared: list[tuple[tuple[int, int], ...]] = []
        for layer in staged.layers:
            weights = staged.expert_weights[layer.layer]
            old_row = int_list(old_map[layer.layer, first : first + num_local])
            # In one process, staged row i is the old content of copies[i].source_slot,
            # i.e. a row of that slot's old expert.
            staged_expert = (
                {old_row[c.source_slot]: i for i, c in enumerate(plans[layer.layer].copies)}
                if local_only
                else {}
            )
            written = dict.fromkeys(layer.written_slots)
            # An empty slot (-1) holds arbitrary bytes: it is copied, never reconstructed.
            staged_expert.pop(-1, None)
            untouched = {old_row[s]: s for s in range(num_local) if s not in written}
            untouched.pop(-1, None)
            again = tuple(
                (slot, staged_expert[old_row[slot]])
                for slot in written
                if old_row[slot] in staged_expert
            )
            rest = [slot for slot in written if old_row[slot] not in staged_expert]
            kept_by = tuple(
                (slot, untouched[old_row[slot]]) for slot in rest if old_row[slot] in untouched
            )
            copied = tuple(slot for slot in rest if old_row[slot] not in untouched)
            index = torch.tensor(copied, dtype=torch.int64)
            old = tuple(w.index_select(0, index.to(w.device)) for w in weights) if copied else ()
            kept.append((copied, old))
            reused.append(again)
            spared.append(kept_by)
        return cls(staged, tuple(kept), tuple(reused), tuple(spared))

    @property
    def bytes_copied(self) -> int:
        """Bytes copied out of the live weights to make the undo possible."""
        return sum(r.numel() * r.element_size() for _, rows in self.rows for r in rows)

    def restore(self) -> None:
        """Write the old rows back (in place, under ``no_grad``)."""
        with torch.no_grad():
            for layer, (copied, old), again, spared in zip(
                self.staged.layers, self.rows, self.from_staged, self.from_slots, strict=True
            ):
                weights = self.staged.expert_weights[layer.layer]
                for k, weight in enumerate(weights):
                    if copied:
                        index = torch.tensor(copied, dtype=torch.int64, device=weight.device)
                        weight.index_copy_(0, index, old[k])
                    for slot, row in again:
                        weight[slot].copy_(layer.rows[row][k])
                    for slot, source in spared:
                        weight[slot].copy_(weight[source])


def check_written(
    model_name: str,
    staged: StagedTransfer,
    table: Tensor,
    new_map: Tensor,
    mode: IntegrityMode,
) -> None:
    """After a commit: every written slot (every local slot of a changed layer in
    ``"full"`` mode) holds its expert's bytes.

    Raises:
        TransferError: a slot does not (rank and layer named).
    """
    rank, num_local = staged.plan.rank, staged.plan.num_local_physical_experts
    for layer in staged.layers:
        weights = staged.expert_weights[layer.layer]
        slots = range(num_local) if mode == "full" else layer.written_slots
        index = torch.tensor(list(slots), dtype=torch.int64)
        got = row_digests(weights, index, mode=mode)
        want = _expected(table, new_map, layer.layer, list(slots), rank * num_local)
        _raise_on_mismatch(model_name, "written to", rank, layer.layer, list(slots), got, want)
