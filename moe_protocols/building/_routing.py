"""Routing logical top-k choices to physical slots, and the grouped SwiGLU expert compute.

Both are written for CUDA graphs and ``torch.compile``: every intermediate
has a shape fixed by the input shapes, and nothing reads a tensor's value on
the host (no ``.item()``, ``.tolist()`` or ``bool()`` of a tensor), so a
captured forward replays correctly after EPLB rewrites the maps in place.
The one exception is the expert compute where no graph can be captured
anyway: on the CPU (eager) and for CUDA dtypes ``grouped_mm`` lacks
(anything but bfloat16) it runs one group at a time and reads the group
offsets on the host. The routing does not validate the maps:
``EplbState`` and the containers' ``set_eplb_state`` do, once.
"""

from __future__ import annotations

from typing import Final

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_protocols.eplb.dispatch import dispatch_to_replicas

__all__ = ["GROUP_ROWS", "route_to_physical", "swiglu_experts"]

GROUP_ROWS: Final = 4
"""Each expert group's rows are padded with zero rows to a multiple of this in
:func:`swiglu_experts`.

CPU matmul kernels compute rows in blocks of four and the rest (and groups of
fewer than four rows) another way, with other rounding, so without padding a
pair's result would depend on how many pairs share its slot, i.e. on the
placement. Padded, outputs are bit-identical wherever EPLB puts an expert (on
one thread: with several, elementwise kernels split large tensors at
positions that move with the placement).
"""


def route_to_physical(
    logical_ids: Tensor,
    logical_to_physical: Tensor,
    replica_count: Tensor,
    expert_load: Tensor | None = None,
    *,
    count_slots: tuple[int, int] | None = None,
    shares: Tensor | None = None,
) -> Tensor:
    """Map the router's choices to physical slots and record the load, in one vectorised step.

    Args:
        logical_ids: ``[tokens, top_k]`` logical expert ids chosen by the router.
        logical_to_physical: ``[logical, max_replicas]`` this layer's row of
            ``logical_to_physical_map`` (slots of each expert, -1 padded).
        replica_count: ``[logical]`` this layer's row of ``logical_replica_count``.
        expert_load: ``[physical]`` this layer's row of ``expert_load_view``;
            one is added at the slot serving each (token, k) pair. None: record nothing.
        count_slots: ``(first, end)``: count only pairs served by slots in
            ``[first, end)`` (every EP rank sees every token and counts its own
            slots, so the load summed over the group is exact). None: count all.
        shares: ``[logical, max_replicas]`` share of each replica in this step's
            tokens (per-step replica dispatch: from
            :func:`moe_protocols.eplb.replica_shares` on this step's per-expert
            counts, the same on every EP rank); applied with
            :func:`moe_protocols.eplb.dispatch_to_replicas` instead of the
            position rule below. None: the position rule.

    Returns:
        ``[tokens, top_k]`` int64 physical slot ids.

    Token ``t`` uses replica ``t % replica_count[expert]`` of each expert it
    chose: consecutive tokens spread over the replicas, and the choice depends
    on the token's position only (not on the data), so shapes stay fixed.
    The replica index is the token's, not the (token, k) pair's: with pair
    indices and ``top_k`` replicas, every token's first choice would land on
    replica 0.
    """
    if shares is not None:
        physical = dispatch_to_replicas(logical_ids, logical_to_physical, shares)
    else:
        token = torch.arange(logical_ids.shape[0], device=logical_ids.device).unsqueeze(1)
        replica = token % replica_count[logical_ids].to(torch.int64)
        physical = logical_to_physical[logical_ids, replica].to(torch.int64)
    if expert_load is not None:
        served = physical.reshape(-1)
        if count_slots is None:
            ones = torch.ones_like(served, dtype=expert_load.dtype)
        else:
            first, end = count_slots
            ones = ((served >= first) & (served < end)).to(expert_load.dtype)
        expert_load.index_add_(0, served, ones)
    return physical


def _experts_by_group(
    rows: Tensor, offsets: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor
) -> Tensor:
    """``down(silu(gate(x)) * up(x))`` of each group's rows, one matmul per group.

    On the CPU this beats one ``grouped_mm`` per projection, whose per-call
    cost is large for small groups. It reads ``offsets`` on the host, which a
    CPU can afford; on CUDA it is the fallback for operands ``grouped_mm``
    refuses. The activation runs over all rows at once: per group, the last
    few elements of each block would take the kernels' scalar tail, whose
    rounding differs, and results would depend on the placement again.
    """
    ends = [int(end) for end in offsets.cpu()]

    def linear(inputs: Tensor, weight: Tensor) -> Tensor:
        out = inputs.new_empty(inputs.shape[0], weight.shape[1])
        out[ends[-1] if ends else 0 :].zero_()  # rows of no group: never read, but defined
        start = 0
        for group, end in enumerate(ends):
            if end > start:  # straight into the rows of out: no copy of the result
                torch.mm(inputs[start:end], weight[group].T, out=out[start:end])
            start = end
        return out

    act = F.silu(linear(rows, gate_proj)).mul_(linear(rows, up_proj))
    return linear(act, down_proj)


def _experts_grouped_mm(
    rows: Tensor, offsets: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor
) -> Tensor:
    """The same with one ``grouped_mm`` per projection: no host reads, fixed shapes."""
    offs = offsets.to(torch.int32)
    gate = F.grouped_mm(rows, gate_proj.transpose(1, 2), offs=offs)
    up = F.grouped_mm(rows, up_proj.transpose(1, 2), offs=offs)
    return F.grouped_mm(F.silu(gate).mul_(up), down_proj.transpose(1, 2), offs=offs)


def _use_grouped_mm(rows: Tensor, weights: tuple[Tensor, ...]) -> bool:
    """Whether :func:`_experts_grouped_mm` applies: bfloat16 operands its kernels accept, on
    CUDA (or any non-CPU device: tracing on ``meta``), or on the CPU while compiling."""
    if rows.dtype != torch.bfloat16 or any(w.dtype != rows.dtype for w in weights):
        return False
    if rows.device.type == "cpu" and not torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (rows, *weights)):
        return False  # grouped_mm's backward rejects expanded gradients
    size = rows.element_size()
    operands = (rows, *(w.transpose(1, 2) for w in weights))
    # Storage offsets, not data pointers: traced tensors have none, and torch
    # allocates storages at least 16-byte aligned.
    return all(
        (stride * size) % 16 == 0 or stride == 1 for t in operands for stride in t.stride()
    ) and all((t.storage_offset() * size) % 16 == 0 for t in operands)


def swiglu_experts(
    hidden: Tensor,
    local_slots: Tensor,
    routing_weights: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
) -> Tensor:
    """The routed SwiGLU experts' output ``[tokens, hidden]``, computed grouped by slot.

    Args:
        hidden: ``[tokens, hidden]`` inputs.
        local_slots: ``[tokens, top_k]`` slot on this rank serving each (token, k)
            pair; a value outside ``[0, slots)`` (e.g. -1) marks a pair served on
            another rank, which contributes zero here.
        routing_weights: ``[tokens, top_k]`` the router's weights of the pairs.
        gate_proj, up_proj: ``[slots, intermediate, hidden]`` (``nn.Linear``
            layout; views such as the halves of a fused ``gate_up`` are fine).
        down_proj: ``[slots, hidden, intermediate]``.

    Each expert computes ``down(silu(gate(x)) * up(x))``; pairs are sorted by
    slot so that each slot's rows are one matmul: one ``grouped_mm`` per
    projection for bfloat16 on CUDA (no host reads), one group at a time
    elsewhere (faster on a CPU). The result of a pair does
    not depend on which slot serves it or how many pairs share that slot (see
    :data:`GROUP_ROWS`), and the k contributions of a token are summed in
    k order, so moving or replicating experts leaves outputs bit-identical.
    """
    num_tokens, top_k = local_slots.shape
    num_slots = gate_proj.shape[0]
    device = local_slots.device
    slots = local_slots.reshape(-1).to(torch.int64)
    here = (slots >= 0) & (slots < num_slots)
    keys = torch.where(here, slots, num_slots)  # pairs served elsewhere sort last
    order = torch.argsort(keys, stable=True)
    # Rows: G zero rows, then each slot's pairs padded with zero rows to a multiple of
    # G = GROUP_ROWS, then the pairs served elsewhere, then unused rows (the capacity is
    # fixed by the shapes; the last G rows are never a pair's, so the elementwise
    # kernels' scalar tail never computes one). A zero row computes exactly zero (no
    # biases): pairs served elsewhere read row 0 instead of being masked.
    g = GROUP_ROWS
    num_pairs = order.shape[0]
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, keys, torch.ones_like(keys))
    sizes = (counts + g - 1) // g * g
    sizes[num_slots] = counts[num_slots]
    sizes[0] += g
    lead = torch.zeros_like(sizes)
    lead[0] = g
    starts = torch.cumsum(sizes, dim=0) - sizes
    first_sorted = torch.cumsum(counts, dim=0) - counts
    sorted_keys = keys[order]
    sorted_row = (
        starts[sorted_keys]
        + lead[sorted_keys]
        + torch.arange(num_pairs, device=device)
        - first_sorted[sorted_keys]
    )
    offsets = torch.cumsum(sizes[:num_slots], dim=0)
    total = num_pairs + num_slots * (g - 1) + 2 * g
    # Index maps first (small integer tensors), then one gather per activation tensor.
    source = torch.full((total,), num_tokens, dtype=torch.int64, device=device)
    source[sorted_row] = order // top_k  # token of each row; num_tokens = the zero row
    pair_row = torch.empty_like(slots)
    pair_row[order] = sorted_row
    pair_row = torch.where(here, pair_row, torch.zeros_like(pair_row))
    padded = torch.cat([hidden, hidden.new_zeros(1, hidden.shape[1])])
    inputs = padded.index_select(0, source)
    compute = (
        _experts_grouped_mm
        if _use_grouped_mm(inputs, (gate_proj, up_proj, down_proj))
        else _experts_by_group
    )
    out_rows = compute(inputs, offsets, gate_proj, up_proj, down_proj)
    pairs = out_rows.index_select(0, pair_row).view(num_tokens, top_k, -1)
    return (pairs * routing_weights.to(pairs.dtype).unsqueeze(-1)).sum(dim=1)
