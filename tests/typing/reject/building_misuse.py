# mypy must reject the marked lines (see tests/test_typing.py for the marker syntax).
from __future__ import annotations

import torch
from torch import nn

from moe_protocols.building import StackedExperts, SwiGLUExperts, route_to_physical


def misuse(experts: nn.ModuleList, layer: SwiGLUExperts) -> None:
    SwiGLUExperts.from_module_list(experts, num_redundant_experts="2")  # E: arg-type
    SwiGLUExperts.from_module_list(experts, {"gate_proj": 1})  # E: dict-item
    StackedExperts([torch.zeros(4, 2)])  # E: arg-type
    route_to_physical(torch.zeros(2, 2), [[0]], torch.ones(1))  # E: arg-type
    layer.update_physical_experts_metadata(num_physical=12, num_local_physical_experts=4)  # E: call-arg
    count: str = layer.num_physical_experts  # E: assignment
