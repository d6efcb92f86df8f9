# mypy must reject the marked lines (see tests/test_typing.py for the marker syntax).
from __future__ import annotations

from collections.abc import MutableSequence, Sequence

from torch import Tensor

from moe_protocols import MixtureOfExperts, MoELayer


class MissingParameter:
    """Counts are right, but set_eplb_state drops the replica counts a runner passes.

    (A *renamed* parameter is invisible to mypy, which ignores the names of
    positional-or-keyword parameters when matching protocols; the runtime
    conformance check catches that case, see tests/test_conformance.py.)
    """

    def __init__(self) -> None:
        self.expert_weights: MutableSequence[Sequence[Tensor]] = []
        self.num_moe_layers = 1
        self.num_expert_groups = 1
        self.num_logical_experts = 8
        self.num_physical_experts = 8
        self.num_local_physical_experts = 8
        self.num_routed_experts = 8
        self.num_shared_experts = 0
        self.num_redundant_experts = 0
        self.moe_layers: Sequence[MoELayer] = []

    def set_eplb_state(
        self,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
    ) -> None: ...

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None: ...


moe: MixtureOfExperts = MissingParameter()  # E: assignment
# N: set_eplb_state
