"""Your own MoE VLM, made EPLB-ready with ``moe_protocols.building``: a worked example.

A small vision-language model written in plain torch, the way an outside
author would: a conv patch tower and a projector feed image tokens to a
language model of two pre-norm blocks (causal self-attention, then an
8-expert top-2 MoE whose experts are an ``nn.ModuleList`` of SwiGLU MLPs).

The lines marked ``# EPLB`` (13 of them) are all it takes to make it
EPLB-ready; ``build(num_redundant_experts=None)`` builds the model without
them, as it was before. The checkpoint keys do not change
(``language_model.layers.0.moe.experts.3.gate_proj.weight`` either way), and
the VLM wrapper needs nothing: ``MoEView`` finds ``.language_model``. Check it::

    moe-protocols inspect examples/own_moe_vlm.py:build
    moe-protocols verify examples/own_moe_vlm.py:build
    python examples/distributed_eplb.py --ranks 2 --model own
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_protocols.building import MoEModelMixin, SwiGLUExperts  # EPLB
from moe_protocols.parallel import ExpertParallelContext  # EPLB

VOCAB, HIDDEN, HEADS, INTERMEDIATE = 128, 64, 4, 96
NUM_EXPERTS, TOP_K, NUM_LAYERS = 8, 2, 2
CHANNELS, PATCH, VISION_WIDTH = 3, 4, 32


class ExpertMLP(nn.Module):
    """One SwiGLU expert: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class MoEFeedForward(nn.Module):
    """Top-2 routing over 8 experts, ``[tokens, hidden] -> [tokens, hidden]``."""

    experts: nn.ModuleList | SwiGLUExperts

    def __init__(self, num_redundant_experts: int | None, ep: ExpertParallelContext) -> None:
        super().__init__()
        self.router = nn.Linear(HIDDEN, NUM_EXPERTS, bias=False)
        experts = nn.ModuleList(ExpertMLP() for _ in range(NUM_EXPERTS))
        self.experts = experts
        if num_redundant_experts is not None:  # EPLB
            self.experts = SwiGLUExperts.from_module_list(  # EPLB
                experts,
                num_redundant_experts=num_redundant_experts,
                ep=ep,
                top_k=TOP_K,  # EPLB
            )  # EPLB

    def forward(self, x: Tensor) -> Tensor:
        weights, ids = self.router(x).softmax(dim=-1).topk(TOP_K, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        if isinstance(self.experts, SwiGLUExperts):  # EPLB
            out: Tensor = self.experts(x, ids, weights)  # EPLB
            return out  # EPLB
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            token, k = torch.where(ids == index)
            out.index_add_(0, token, weights[token, k].unsqueeze(1) * expert(x[token]))
        return out


class Block(nn.Module):
    """Pre-norm residual block: causal self-attention, then the MoE feed-forward."""

    def __init__(self, num_redundant_experts: int | None, ep: ExpertParallelContext) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(HIDDEN)
        self.attn = nn.MultiheadAttention(HIDDEN, HEADS, bias=False, batch_first=True)
        self.moe_norm = nn.RMSNorm(HIDDEN)
        self.moe = MoEFeedForward(num_redundant_experts, ep)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, width = x.shape
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)
        normed = self.attn_norm(x)
        x = x + self.attn(normed, normed, normed, attn_mask=causal, need_weights=False)[0]
        moe_out: Tensor = self.moe(self.moe_norm(x).reshape(batch * seq, width))
        return x + moe_out.view(batch, seq, width)


class MoELanguageModel(nn.Module, MoEModelMixin):  # EPLB: MoEModelMixin
    """The language model: embeddings, blocks, norm, LM head."""

    def __init__(self, num_redundant_experts: int | None, ep: ExpertParallelContext) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        blocks = [Block(num_redundant_experts, ep) for _ in range(NUM_LAYERS)]
        self.layers = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        if num_redundant_experts is not None:  # EPLB
            self.init_moe_layers([block.moe.experts for block in blocks])  # EPLB

    def forward(self, inputs_embeds: Tensor) -> Tensor:
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden)
        logits: Tensor = self.lm_head(self.norm(hidden))
        return logits


class OwnMoEVLM(nn.Module):
    """Image patches and text tokens in, next-token logits ``[batch, seq, vocab]`` out."""

    def __init__(
        self, num_redundant_experts: int | None = 2, ep: ExpertParallelContext | None = None
    ) -> None:
        super().__init__()
        self.vision_tower = nn.Sequential(
            nn.Conv2d(CHANNELS, VISION_WIDTH, PATCH, stride=PATCH),
            nn.GELU(),
            nn.Conv2d(VISION_WIDTH, VISION_WIDTH, 1),
        )
        self.projector = nn.Sequential(
            nn.Linear(VISION_WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN)
        )
        self.language_model = MoELanguageModel(num_redundant_experts, ep or ExpertParallelContext())

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        """``input_ids [batch, text]``, ``pixel_values [batch, 3, H, W]`` (image tokens first)."""
        embeds = self.language_model.embed_tokens(input_ids)
        if pixel_values is not None:
            patches = self.vision_tower(pixel_values).flatten(2).transpose(1, 2)
            embeds = torch.cat([self.projector(patches), embeds], dim=1)
        logits: Tensor = self.language_model(inputs_embeds=embeds)
        return logits


def build(
    num_redundant_experts: int | None = 2,
    *,
    ep: ExpertParallelContext | None = None,
    seed: int = 0,
) -> OwnMoEVLM:
    """The model in eval mode, weights drawn from ``seed`` (the same on every EP rank).

    ``num_redundant_experts=None`` builds the plain model (no EPLB lines).
    """
    torch.manual_seed(seed)  # pyright: ignore[reportUnknownMemberType]  # torch leaves `seed` unannotated
    return OwnMoEVLM(num_redundant_experts, ep).eval()


if __name__ == "__main__":
    from moe_protocols import verify_eplb_integration

    report = verify_eplb_integration(build())
    print(report)
    raise SystemExit(0 if report.ok else 1)
