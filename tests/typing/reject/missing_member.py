# mypy must reject the marked lines (see tests/test_typing.py for the marker syntax).
from __future__ import annotations

from collections.abc import MutableSequence, Sequence

from torch import Tensor

from moe_protocols import MixtureOfExperts, MoELayer


class NoRedundantExperts:
    """Everything a MixtureOfExperts has, except num_redundant_experts."""

    def __init__(self) -> None:
        self.expert_weights: MutableSequence[Sequence[Tensor]] = []
        self.num_moe_layers = 1
        self.num_expert_groups = 1
        self.num_logical_experts = 8
        self.num_physical_experts = 8
        self.num_local_physical_experts = 8
        self.num_routed_experts = 8
        self.num_shared_experts = 0
        self.moe_layers: Sequence[MoELayer] = []

    def set_eplb_state(
        self,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None: ...

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None: ...


moe: MixtureOfExperts = NoRedundantExperts()  # E: assignment
# N: num_redundant_experts
