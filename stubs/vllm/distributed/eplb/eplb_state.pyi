# vLLM 0.33 `vllm/distributed/eplb/eplb_state.py`: the model-facing entry points
# (shared/research/vllm.md section 3).
from collections.abc import Sequence

import torch
from torch import Tensor
from vllm.config import ModelConfig, ParallelConfig
from vllm.model_executor.models.interfaces import MixtureOfExperts

class EplbState:
    def __init__(self, parallel_config: ParallelConfig, device: torch.device) -> None: ...
    def add_model(
        self,
        model: MixtureOfExperts,
        model_config: ModelConfig,
        model_name: str | None = None,
    ) -> None: ...
    def step(
        self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False
    ) -> None: ...
    def rearrange(
        self,
        is_profile: bool = False,
        rank_mapping: dict[int, int] | None = None,
        use_last_expert_load: bool = False,
    ) -> Tensor | None: ...
    def update_mapping(
        self, model_config: ModelConfig, expanded_physical_to_logical: Tensor
    ) -> None: ...
    @classmethod
    def from_mapping(
        cls,
        model: MixtureOfExperts,
        model_config: ModelConfig,
        device: torch.device,
        parallel_config: ParallelConfig,
        expanded_physical_to_logical: Tensor,
    ) -> EplbState: ...
    @staticmethod
    def build_initial_global_physical_to_logical_map(
        num_routed_experts: int, num_redundant_experts: int
    ) -> Sequence[int]: ...
