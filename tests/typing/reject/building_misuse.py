# Misuse of the building blocks that both checkers must reject; the marker syntax is
# explained at the top of implementations.py and in tests/test_typing.py.
from __future__ import annotations

import torch
from torch import nn

from moe_protocols.building import StackedExperts, SwiGLUExperts, route_to_physical


def misuse(experts: nn.ModuleList, layer: SwiGLUExperts) -> str:
    SwiGLUExperts.from_module_list(experts, num_redundant_experts="2")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    SwiGLUExperts.from_module_list(experts, {"gate_proj": 1})  # type: ignore[dict-item]  # pyright: ignore[reportArgumentType]
    StackedExperts([torch.zeros(4, 2)])  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    route_to_physical(torch.zeros(2, 2), [[0]], torch.ones(1))  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    layer.update_physical_experts_metadata(num_physical=12, num_local_physical_experts=4)  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
    count: str = layer.num_physical_experts  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    return count
