"""Configurations of the reference models, and the errors they raise on bad input.

Every field is validated when the config is built, so a model never starts
from an inconsistent shape. Defaults are tiny: a forward over a few dozen
tokens takes milliseconds on one CPU core.
"""

from __future__ import annotations

from typing import Final

import attrs

from moe_protocols._validate import Validator, int_field
from moe_protocols.errors import EplbConfigError, ModelConfigError, ModelInputError

__all__ = ["ModelConfigError", "ModelInputError", "TinyMoEConfig", "TinyVLMConfig"]


def _at_least(minimum: int) -> Validator:
    """Validator: the field is an ``int`` (not a ``bool``) and at least ``minimum``."""
    return int_field(
        minimum,
        ModelConfigError,
        template="{label} must be >= {minimum}, got {value}",
        type_template="{label} must be an int, got {type} {value!r}",
    )


_redundant_count: Final = int_field(
    0,
    EplbConfigError,
    template="{label} must be an int >= {minimum} (extra physical expert slots), got {value!r}",
)


@attrs.frozen
class TinyMoEConfig:
    """Shape of a ``TinyMoEForCausalLM``: a DeepSeek-V2-like decoder, shrunk to toy size.

    The first ``first_k_dense`` layers use a dense MLP, the rest a MoE block with
    ``num_experts`` logical experts of width ``intermediate_size``, ``top_k`` of
    them per token. Routing is group-limited when ``num_expert_groups > 1``: the
    ``topk_groups`` groups with the best single expert score are kept, then the
    top-k is taken inside them. ``num_redundant_experts`` extra physical slots
    hold replicas (EPLB moves them); ``num_shared_experts`` always-on experts are
    fused into one MLP of width ``num_shared_experts * intermediate_size``.
    ``seed`` fixes every weight: equal configs build parameter-equal models.
    """

    vocab_size: int = attrs.field(default=128, validator=_at_least(2))
    hidden_size: int = attrs.field(default=32, validator=_at_least(1))
    intermediate_size: int = attrs.field(default=64, validator=_at_least(1))
    num_layers: int = attrs.field(default=4, validator=_at_least(1))
    first_k_dense: int = attrs.field(default=1, validator=_at_least(0))
    num_experts: int = attrs.field(default=8, validator=_at_least(1))
    top_k: int = attrs.field(default=2, validator=_at_least(1))
    num_expert_groups: int = attrs.field(default=1, validator=_at_least(1))
    topk_groups: int = attrs.field(default=1, validator=_at_least(1))
    num_redundant_experts: int = attrs.field(default=0, validator=_redundant_count)
    num_shared_experts: int = attrs.field(default=0, validator=_at_least(0))
    seed: int = attrs.field(default=0, validator=_at_least(0))

    def __attrs_post_init__(self) -> None:
        def fail(what: str) -> ModelConfigError:
            return ModelConfigError(f"TinyMoEConfig: {what}")

        if self.first_k_dense > self.num_layers:
            raise fail(f"first_k_dense={self.first_k_dense} exceeds num_layers={self.num_layers}")
        if self.top_k > self.num_experts:
            raise fail(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.num_experts % self.num_expert_groups != 0:
            raise fail(
                f"num_experts={self.num_experts} is not divisible by "
                f"num_expert_groups={self.num_expert_groups}"
            )
        if self.topk_groups > self.num_expert_groups:
            raise fail(
                f"topk_groups={self.topk_groups} exceeds num_expert_groups={self.num_expert_groups}"
            )
        reachable = self.topk_groups * self.experts_per_group
        if self.top_k > reachable:
            raise fail(
                f"top_k={self.top_k} exceeds the {reachable} experts in the "
                f"topk_groups={self.topk_groups} selected groups of {self.experts_per_group}"
            )

    @property
    def experts_per_group(self) -> int:
        """Logical experts in each routing group."""
        return self.num_experts // self.num_expert_groups

    @property
    def num_moe_layers(self) -> int:
        """Decoder layers whose FFN is a MoE block."""
        return self.num_layers - self.first_k_dense

    @property
    def num_physical_experts(self) -> int:
        """Physical expert slots over all EP ranks: logical plus redundant."""
        return self.num_experts + self.num_redundant_experts


@attrs.frozen
class TinyVLMConfig:
    """Shape of a ``TinyVLMForConditionalGeneration``: a patch vision tower around a tiny MoE LM.

    Images are ``[num_channels, image_size, image_size]``, cut into square
    patches of ``patch_size``; each patch becomes one token prepended to the
    text. ``seed`` fixes the vision tower and projector; the language model's
    weights come from ``text.seed``.
    """

    text: TinyMoEConfig = attrs.field(factory=TinyMoEConfig)
    image_size: int = attrs.field(default=8, validator=_at_least(1))
    patch_size: int = attrs.field(default=4, validator=_at_least(1))
    num_channels: int = attrs.field(default=3, validator=_at_least(1))
    vision_hidden_size: int = attrs.field(default=32, validator=_at_least(1))
    vision_layers: int = attrs.field(default=2, validator=_at_least(0))
    seed: int = attrs.field(default=0, validator=_at_least(0))

    def __attrs_post_init__(self) -> None:
        if self.image_size % self.patch_size != 0:
            raise ModelConfigError(
                f"TinyVLMConfig: image_size={self.image_size} is not divisible by "
                f"patch_size={self.patch_size}"
            )

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image contributes (patches per image)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch."""
        return self.num_channels * self.patch_size * self.patch_size
