"""A MoE LM written the way an outside author would: plain torch, no project helpers.

It implements ``MixtureOfExperts`` by hand (plain attributes, a loop over its
layers) with stacked ``[slots, hidden, hidden]`` expert weights whose
redundant slots start as replicas. Flags switch on the integration bugs that
authors really make, so the tests can check that EPLB notices them.
"""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence

import torch
from torch import Tensor, nn

from moe_protocols import MoELayer


class AuthorMoELayer(nn.Module):
    """Top-k routing over ``num_experts`` logical experts held in ``slots`` physical slots."""

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        slots: int,
        top_k: int,
        *,
        records: bool = True,
        load_sign: int = 1,
        replicas: bool = True,
    ) -> None:
        super().__init__()
        self.top_k, self.slots, self.records, self.load_sign = top_k, slots, records, load_sign
        self.router = nn.Linear(hidden, num_experts, bias=False)
        experts = torch.randn(num_experts, hidden, hidden) * 0.3
        extra = torch.arange(slots - num_experts) % num_experts
        redundant = experts[extra] if replicas else torch.randn(len(extra), hidden, hidden)
        self.w = nn.Parameter(torch.cat([experts, redundant]))
        self.load: Tensor | None = None
        self.l2p: Tensor | None = None
        self.count: Tensor | None = None

    def get_expert_weights(self) -> list[Tensor]:
        return [self.w]

    def set_eplb_state(
        self,
        moe_layer_idx: int,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        self.load = expert_load_view[moe_layer_idx]
        self.l2p = logical_to_physical_map[moe_layer_idx]
        self.count = logical_replica_count[moe_layer_idx]

    def forward(self, x: Tensor) -> Tensor:
        scores: Tensor = self.router(x)
        gates, ids = scores.softmax(dim=-1).topk(self.top_k, dim=-1)
        if self.l2p is None or self.count is None:
            slot = ids
        else:
            replica = torch.arange(x.shape[0])[:, None] % self.count[ids]
            slot = self.l2p[ids, replica]
            if self.records and self.load is not None:
                counted = torch.bincount(slot.flatten(), minlength=self.slots)
                self.load.add_((counted * self.load_sign).to(self.load.dtype))
        out = torch.einsum("th,tkhd->tkd", x, self.w[slot])
        return x + (gates.unsqueeze(-1) * out).sum(dim=1)


class AuthorMoELM(nn.Module):
    """Embedding, ``layers`` MoE layers, a head; the MixtureOfExperts members by hand."""

    def __init__(
        self,
        *,
        layers: int = 3,
        num_experts: int = 8,
        num_redundant: int = 4,
        top_k: int = 2,
        hidden: int = 16,
        vocab: int = 64,
        silent_layers: tuple[int, ...] = (),
        negative_layers: tuple[int, ...] = (),
        independent_replicas: tuple[int, ...] = (),
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        slots = num_experts + num_redundant
        self.embed = nn.Embedding(vocab, hidden)
        blocks = [
            AuthorMoELayer(
                hidden,
                num_experts,
                slots,
                top_k,
                records=i not in silent_layers,
                load_sign=-1 if i in negative_layers else 1,
                replicas=i not in independent_replicas,
            )
            for i in range(layers)
        ]
        self.layers = nn.ModuleList(blocks)
        self.head = nn.Linear(hidden, vocab)
        self.blocks = blocks  # the MoE layers as their own class, for tests to reach into
        # Annotated as the protocol declares them: its attributes are invariant.
        self.moe_layers: Sequence[MoELayer] = list(blocks)
        self.expert_weights: MutableSequence[Sequence[Tensor]] = [
            block.get_expert_weights() for block in blocks
        ]
        self.num_moe_layers = layers
        self.num_expert_groups = 1
        self.num_logical_experts = num_experts
        self.num_physical_experts = slots
        self.num_local_physical_experts = slots
        self.num_routed_experts = num_experts
        self.num_shared_experts = 0
        self.num_redundant_experts = num_redundant

    def set_eplb_state(
        self,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        for i, layer in enumerate(self.moe_layers):
            layer.set_eplb_state(
                i, expert_load_view, logical_to_physical_map, logical_replica_count
            )

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        self.num_physical_experts = num_physical_experts
        self.num_local_physical_experts = num_local_physical_experts
        self.num_redundant_experts = num_physical_experts - self.num_logical_experts

    def forward(self, input_ids: Tensor) -> Tensor:
        x: Tensor = self.embed(input_ids.flatten())
        for layer in self.layers:
            x = layer(x)
        logits: Tensor = self.head(x)
        return logits


class AuthorVLM(nn.Module):
    """A wrapper an author puts around the LM: ``get_language_model()`` and a forward."""

    def __init__(self, language_model: AuthorMoELM) -> None:
        super().__init__()
        self.language_model = language_model

    def get_language_model(self) -> AuthorMoELM:
        return self.language_model

    def forward(self, input_ids: Tensor) -> Tensor:
        logits: Tensor = self.language_model(input_ids)
        return logits


def tokens(seed: int = 0, count: int = 48, vocab: int = 64) -> Tensor:
    """A fixed batch of token ids."""
    return torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(seed))
