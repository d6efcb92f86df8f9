# vLLM 0.33 `vllm/model_executor/models/interfaces_base.py`: the model
# protocol `SupportsMultiModal.get_language_model` returns.
from typing import Protocol, runtime_checkable

from torch import Tensor

@runtime_checkable
class VllmModel(Protocol):
    def embed_input_ids(self, input_ids: Tensor) -> Tensor: ...
    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor: ...
