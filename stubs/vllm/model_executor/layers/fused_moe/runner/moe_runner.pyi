# vLLM 0.33 `vllm/model_executor/layers/fused_moe/runner/moe_runner.py`: the
# EPLB-facing surface of MoERunner. A concrete nn.Module class, as in vLLM
# (there via MoERunnerInterface(PluggableLayer, ABC), PluggableLayer being an
# nn.Module), so that `Sequence[MoERunner]` is as strict here as against the
# real source.
from abc import ABC
from collections.abc import Iterable

from torch import Tensor, nn

class MoERunner(nn.Module, ABC):
    def get_expert_weights(self) -> Iterable[Tensor]: ...
    def set_eplb_state(
        self,
        moe_layer_idx: int,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None: ...
