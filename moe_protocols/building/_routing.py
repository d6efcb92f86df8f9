"""Routing logical top-k choices to physical slots, and the grouped SwiGLU expert compute.

Both functions are written for CUDA graphs and ``torch.compile``: they never
read a tensor's value on the host (no ``.item()``, ``.tolist()`` or ``bool()``
of a tensor) and every intermediate has a shape fixed by the input shapes, so
a captured forward replays correctly after EPLB rewrites the maps in place.
The price is that they do not validate the maps: ``EplbState`` and
``layer_eplb_rows`` validate them before a layer ever sees them.
"""

from __future__ import annotations

from typing import Final

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MIN_GROUP_ROWS", "route_to_physical", "swiglu_experts"]

MIN_GROUP_ROWS: Final = 4
"""Rows every non-empty expert group is padded to in :func:`swiglu_experts`.

CPU matmul kernels take another path (with other rounding) for fewer than
four rows, so a pair's result would depend on how many other pairs its slot
serves, i.e. on the placement. Padding every group with ``MIN_GROUP_ROWS - 1``
zero rows keeps outputs bit-identical wherever EPLB puts an expert.
"""


def route_to_physical(
    logical_ids: Tensor,
    logical_to_physical: Tensor,
    replica_count: Tensor,
    expert_load: Tensor | None = None,
    *,
    count_slots: tuple[int, int] | None = None,
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

    Returns:
        ``[tokens, top_k]`` int64 physical slot ids.

    Token ``t`` uses replica ``t % replica_count[expert]`` of each expert it
    chose: consecutive tokens spread over the replicas, and the choice depends
    on the token's position only (not on the data), so shapes stay fixed.
    The replica index is the token's, not the (token, k) pair's: with pair
    indices and ``top_k`` replicas, every token's first choice would land on
    replica 0.
    """
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


def _grouped_linear(rows: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """``rows[group g] @ weight[g].T`` for consecutive groups ending at ``offsets``.

    ``torch.nn.functional.grouped_mm`` where its kernels accept the operands
    (float32/bfloat16/float16 on the CPU, bfloat16 on CUDA, 16-byte aligned
    strides); otherwise one matmul per group, which reads ``offsets`` on the
    host (correct, but not capturable in a CUDA graph).
    """
    mat_b = weight.transpose(1, 2)
    if _grouped_mm_accepts(rows, mat_b):
        return F.grouped_mm(rows, mat_b, offs=offsets.to(torch.int32))
    out = rows.new_zeros(rows.shape[0], weight.shape[1])
    start = 0
    ends = [int(end) for end in offsets.cpu()]
    for group, end in enumerate(ends):
        if end > start:
            out[start:end] = rows[start:end] @ weight[group].T
        start = end
    return out


def _grouped_mm_accepts(mat_a: Tensor, mat_b: Tensor) -> bool:
    if mat_a.device.type == "cpu":
        dtypes = {torch.float32, torch.bfloat16, torch.float16}
    elif mat_a.device.type == "cuda":
        dtypes = {torch.bfloat16}
    else:
        return False
    if mat_a.dtype not in dtypes or mat_b.dtype != mat_a.dtype:
        return False
    if torch.is_grad_enabled() and (mat_a.requires_grad or mat_b.requires_grad):
        return False  # its CPU backward rejects expanded gradients; the loop is differentiable
    size = mat_a.element_size()
    # Storage offsets, not data pointers: tracing (fake tensors) has no pointers, and torch
    # allocates storages at least 16-byte aligned.
    return all(
        (stride * size) % 16 == 0 or stride == 1
        for tensor in (mat_a, mat_b)
        for stride in tensor.stride()
    ) and all((t.storage_offset() * size) % 16 == 0 for t in (mat_a, mat_b))


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
    slot so that each slot's rows are one matmul. The result of a pair does
    not depend on which slot serves it or how many pairs share that slot (see
    :data:`MIN_GROUP_ROWS`), and the k contributions of a token are summed in
    k order, so moving or replicating experts leaves outputs bit-identical.
    """
    num_tokens, top_k = local_slots.shape
    num_slots = gate_proj.shape[0]
    device = local_slots.device
    slots = local_slots.reshape(-1).to(torch.int64)
    here = (slots >= 0) & (slots < num_slots)
    keys = torch.where(here, slots, num_slots)  # pairs served elsewhere sort last
    order = torch.argsort(keys, stable=True)
    # Every group starts with MIN_GROUP_ROWS - 1 zero rows; the sorted pair i of group g
    # sits at row i + pad * (g + 1). A zero row computes exactly zero (no biases), so
    # pairs served elsewhere read row 0 (a padding row) instead of being masked.
    pad = MIN_GROUP_ROWS - 1
    sorted_row = torch.arange(order.shape[0], device=device) + pad * (keys[order] + 1)
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, keys, torch.ones_like(keys))
    offsets = torch.cumsum(counts[:num_slots] + pad, dim=0)
    total = order.shape[0] + pad * (num_slots + 1)
    # Index maps first (small integer tensors), then one gather per activation tensor.
    source = torch.full((total,), num_tokens, dtype=torch.int64, device=device)
    source[sorted_row] = order // top_k  # token of each row; num_tokens = the zero row
    pair_row = torch.empty_like(slots)
    pair_row[order] = sorted_row
    pair_row = torch.where(here, pair_row, torch.zeros_like(pair_row))
    padded = torch.cat([hidden, hidden.new_zeros(1, hidden.shape[1])])
    inputs = padded.index_select(0, source)
    gate = _grouped_linear(inputs, gate_proj, offsets)
    up = _grouped_linear(inputs, up_proj, offsets)
    act = F.silu(gate).mul_(up)
    out_rows = _grouped_linear(act, down_proj, offsets)
    pairs = out_rows.index_select(0, pair_row).view(num_tokens, top_k, -1)
    return (pairs * routing_weights.to(pairs.dtype).unsqueeze(-1)).sum(dim=1)
