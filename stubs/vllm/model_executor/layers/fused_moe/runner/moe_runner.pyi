# The EPLB-facing surface of vLLM 0.33's MoERunner (see stubs/README.md for why
# it is declared structurally here).
from collections.abc import Iterable
from typing import Protocol

from torch import Tensor

class MoERunner(Protocol):
    def get_expert_weights(self) -> Iterable[Tensor]: ...
    def set_eplb_state(
        self,
        moe_layer_idx: int,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None: ...
