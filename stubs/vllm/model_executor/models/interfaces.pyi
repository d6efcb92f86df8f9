# vLLM 0.33 `vllm/model_executor/models/interfaces.py`: the members a runner and
# EPLB consume. Written from shared/research/vllm.md sections 1.1-1.4 and
# checked against the release by the vllm tier (stubtest and
# tests/integrations/vllm/test_vllm_stubs.py compare every annotation here with vLLM's).
from collections.abc import MutableSequence, Sequence
from typing import ClassVar, Literal, Protocol, overload, runtime_checkable

from torch import Tensor
from typing_extensions import TypeIs
from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
from vllm.model_executor.models.interfaces_base import VllmModel

@runtime_checkable
class MixtureOfExperts(Protocol):
    expert_weights: MutableSequence[Sequence[Tensor]]
    num_moe_layers: int
    num_expert_groups: int
    num_logical_experts: int
    num_physical_experts: int
    num_local_physical_experts: int
    num_routed_experts: int
    num_shared_experts: int
    num_redundant_experts: int
    moe_layers: Sequence[MoERunner]
    def set_eplb_state(
        self,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None: ...
    def update_physical_experts_metadata(
        self,
        num_physical_experts: int,
        num_local_physical_experts: int,
    ) -> None: ...

@runtime_checkable
class SupportsMultiModalEmbeddings(Protocol):
    supports_multimodal_embeddings: ClassVar[Literal[True]]

@runtime_checkable
class SupportsMultiModal(SupportsMultiModalEmbeddings, Protocol):
    supports_multimodal: ClassVar[Literal[True]]
    def get_language_model(self) -> VllmModel: ...

@overload
def supports_multimodal(model: type[object]) -> TypeIs[type[SupportsMultiModal]]: ...
@overload
def supports_multimodal(model: object) -> TypeIs[SupportsMultiModal]: ...
def is_mixture_of_experts(model: object) -> TypeIs[MixtureOfExperts]: ...
def get_mixture_of_experts_model(model: object) -> MixtureOfExperts | None: ...
