"""Tiny vision-language wrappers around ``TinyMoEForCausalLM``: the case the library exists for.

``TinyVLMForConditionalGeneration`` holds a MoE language model but does not
itself implement ``MixtureOfExperts`` (like Kimi-K2.5 around DeepSeek-V2): a
runner that checks only the top object misses the MoE model inside.
``TinyProxyVLMForConditionalGeneration`` is the hand-written alternative
(like vLLM's Llama-4 and Qwen3-VL-MoE wrappers): it implements the protocol by
forwarding every member to its language model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_protocols.adapters._forward import forwarded
from moe_protocols.models._config import (
    ModelConfigError,
    ModelInputError,
    TinyMoEConfig,
    TinyVLMConfig,
)
from moe_protocols.models._tiny_moe import (
    SINGLE_PROCESS,
    TinyDenseMLP,
    TinyMoEForCausalLM,
    _normal,  # pyright: ignore[reportPrivateUsage]  # shared inside the private models package
)

if TYPE_CHECKING:
    from collections.abc import MutableSequence, Sequence

    from moe_protocols.parallel import ExpertParallelContext
    from moe_protocols.protocols import MoELayer

__all__ = [
    "TinyProxyVLMForConditionalGeneration",
    "TinyVLMForConditionalGeneration",
    "TinyVisionTower",
    "tiny_proxy_vlm",
    "tiny_vlm",
]


class _VisionBlock(nn.Module):
    """Pre-norm residual MLP over patch tokens ``[batch, patches, vision_hidden]``."""

    def __init__(self, width: int, generator: torch.Generator) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.mlp = TinyDenseMLP(width, 2 * width, generator)

    def forward(self, hidden: Tensor) -> Tensor:
        mlp_out: Tensor = self.mlp(self.norm(hidden))
        return hidden + mlp_out


class TinyVisionTower(nn.Module):
    """Turn images ``[batch, channels, size, size]`` into patch tokens.

    Output: ``[batch, patches, vision_hidden]``, one token per square patch.
    """

    def __init__(self, config: TinyVLMConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.config = config
        width = config.vision_hidden_size
        self.patch_embed: nn.Parameter = _normal(
            generator, width, config.patch_dim, std=config.patch_dim**-0.5
        )
        self.position_embed: nn.Parameter = _normal(
            generator, config.num_image_tokens, width, std=0.02
        )
        self.blocks: nn.ModuleList = nn.ModuleList(
            [_VisionBlock(width, generator) for _ in range(config.vision_layers)]
        )
        self.norm: nn.RMSNorm = nn.RMSNorm(width, eps=1e-6)

    def forward(self, pixel_values: Tensor) -> Tensor:
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ModelInputError(
                f"TinyVisionTower: pixel_values must be [batch, {', '.join(map(str, expected))}], "
                f"got shape {tuple(pixel_values.shape)}"
            )
        batch, side, patch = pixel_values.shape[0], cfg.image_size // cfg.patch_size, cfg.patch_size
        patches = (
            pixel_values.reshape(batch, cfg.num_channels, side, patch, side, patch)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(batch, side * side, cfg.patch_dim)
        )
        hidden = F.linear(patches, self.patch_embed) + self.position_embed
        for block in self.blocks:
            hidden = block(hidden)
        normed: Tensor = self.norm(hidden)
        return normed


class TinyVLMForConditionalGeneration(nn.Module):
    """A vision-language model around a MoE LM that does NOT implement ``MixtureOfExperts``.

    ``forward(input_ids [batch, seq], pixel_values [batch, C, S, S] | None)``
    returns logits ``[batch, image_tokens + seq, vocab]``: image tokens are
    projected into the LM's hidden size and prepended to the text embeddings.
    The MoE model is reachable as ``language_model`` and via
    ``get_language_model()``, and nowhere else.
    """

    def __init__(
        self, config: TinyVLMConfig, *, ep: ExpertParallelContext = SINGLE_PROCESS
    ) -> None:
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        self.vision_tower: TinyVisionTower = TinyVisionTower(config, generator)
        text_hidden = config.text.hidden_size
        self.projector_in: nn.Parameter = _normal(
            generator, text_hidden, config.vision_hidden_size, std=config.vision_hidden_size**-0.5
        )
        self.projector_out: nn.Parameter = _normal(
            generator, text_hidden, text_hidden, std=text_hidden**-0.5
        )
        self.language_model: TinyMoEForCausalLM = TinyMoEForCausalLM(config.text, ep=ep)

    def get_language_model(self) -> TinyMoEForCausalLM:
        """The wrapped MoE language model."""
        return self.language_model

    def embed_images(self, pixel_values: Tensor) -> Tensor:
        """Image tokens in the LM's embedding space: ``[batch, image_tokens, text_hidden]``."""
        vision: Tensor = self.vision_tower(pixel_values)
        return F.linear(F.gelu(F.linear(vision, self.projector_in)), self.projector_out)

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        """Logits ``[batch, image_tokens + seq, vocab]``; ``[batch, seq, vocab]`` without images."""
        embeds = self.language_model.embed_input_ids(input_ids)
        if pixel_values is not None:
            if pixel_values.shape[0] != input_ids.shape[0]:
                raise ModelInputError(
                    f"{type(self).__name__}: pixel_values has batch {pixel_values.shape[0]}, "
                    f"input_ids has batch {input_ids.shape[0]}"
                )
            image_embeds = self.embed_images(pixel_values).to(embeds.dtype)
            embeds = torch.cat([image_embeds, embeds], dim=1)
        logits: Tensor = self.language_model(inputs_embeds=embeds)
        return logits


class TinyProxyVLMForConditionalGeneration(TinyVLMForConditionalGeneration):
    """The same VLM, implementing ``MixtureOfExperts`` by forwarding every member to the LM.

    This is the per-wrapper boilerplate the library's ``MoEView`` replaces.
    Each data member is declared as an attribute of the protocol's type (what
    pyright requires of a protocol attribute; a property is never accepted)
    and forwarded, reads and writes, to ``language_model``, so
    ``moe_layers`` and ``expert_weights`` are the language model's own
    objects; the methods forward by keyword.
    """

    expert_weights: MutableSequence[Sequence[Tensor]] = forwarded("language_model")
    moe_layers: Sequence[MoELayer] = forwarded("language_model")
    num_moe_layers: int = forwarded("language_model")
    num_expert_groups: int = forwarded("language_model")
    num_logical_experts: int = forwarded("language_model")
    num_physical_experts: int = forwarded("language_model")
    num_local_physical_experts: int = forwarded("language_model")
    num_routed_experts: int = forwarded("language_model")
    num_shared_experts: int = forwarded("language_model")
    num_redundant_experts: int = forwarded("language_model")

    def set_eplb_state(
        self,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        """Forwarded to the language model (which fills its ``expert_weights``)."""
        self.language_model.set_eplb_state(
            expert_load_view=expert_load_view,
            logical_to_physical_map=logical_to_physical_map,
            logical_replica_count=logical_replica_count,
        )

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        """Forwarded to the language model."""
        self.language_model.update_physical_experts_metadata(
            num_physical_experts=num_physical_experts,
            num_local_physical_experts=num_local_physical_experts,
        )


def _vlm_config(overrides: dict[str, int]) -> TinyVLMConfig:
    vision_fields = set(attrs.fields_dict(TinyVLMConfig)) - {"text"}
    text_fields = set(attrs.fields_dict(TinyMoEConfig))
    unknown = sorted(set(overrides) - vision_fields - text_fields)
    if unknown:
        raise ModelConfigError(
            f"tiny VLM has no setting(s) {unknown}; settings are "
            f"{sorted(vision_fields | text_fields)}"
        )
    # ``seed`` names both configs' field: one seed fixes the whole model.
    text = TinyMoEConfig(**{k: v for k, v in overrides.items() if k in text_fields})
    vision = {k: v for k, v in overrides.items() if k in vision_fields}
    return TinyVLMConfig(text=text, **vision)


def tiny_vlm(
    *, ep: ExpertParallelContext = SINGLE_PROCESS, **overrides: int
) -> TinyVLMForConditionalGeneration:
    """Build a ``TinyVLMForConditionalGeneration`` with tiny defaults.

    Keywords override fields of ``TinyVLMConfig`` (vision) or ``TinyMoEConfig``
    (language model); ``seed`` sets both. E.g. ``tiny_vlm(num_redundant_experts=2)``.
    """
    return TinyVLMForConditionalGeneration(_vlm_config(overrides), ep=ep)


def tiny_proxy_vlm(
    *, ep: ExpertParallelContext = SINGLE_PROCESS, **overrides: int
) -> TinyProxyVLMForConditionalGeneration:
    """Build a ``TinyProxyVLMForConditionalGeneration``; keywords as for ``tiny_vlm``."""
    return TinyProxyVLMForConditionalGeneration(_vlm_config(overrides), ep=ep)
