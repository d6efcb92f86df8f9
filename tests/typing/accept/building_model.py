"""mypy and pyright (strict) must accept this file: models built from the blocks are MoE models.

``SwiGLUExperts`` is a ``MoELayer`` and an ``ElasticMoELayer``; a model using
``MoEModelMixin`` is a ``MixtureOfExperts``. (Against vLLM's protocol pyright
reports ``moe_layers`` invariance, as it does for ``MoEView``: a protocol-typing
matter, not the blocks'.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_protocols import MixtureOfExperts, MoELayer
from moe_protocols.building import ElasticMoELayer, MoEModelMixin, SwiGLUExperts


class TinyAuthorModel(nn.Module, MoEModelMixin):
    def __init__(self) -> None:
        super().__init__()
        weights = {
            "gate_proj": torch.zeros(4, 8, 16),
            "up_proj": torch.zeros(4, 8, 16),
            "down_proj": torch.zeros(4, 16, 8),
        }
        self.experts = SwiGLUExperts(weights, num_redundant_experts=2, top_k=2)
        self.init_moe_layers([self.experts])

    def forward(self, hidden: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        out: Tensor = self.experts(hidden, ids, weights)
        return out


def model_is_our_protocol() -> MixtureOfExperts:
    moe: MixtureOfExperts = TinyAuthorModel()
    return moe


def experts_are_layers(experts: SwiGLUExperts) -> tuple[MoELayer, ElasticMoELayer]:
    return experts, experts


def counts_are_ints(model: TinyAuthorModel) -> int:
    model.update_physical_experts_metadata(
        num_physical_experts=model.num_physical_experts,
        num_local_physical_experts=model.num_local_physical_experts,
    )
    return model.num_redundant_experts + model.num_moe_layers
