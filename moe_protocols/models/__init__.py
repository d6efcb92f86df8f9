"""Tiny reference models: a native MoE LM, a VLM wrapper that hides it, and a forwarding proxy.

Small enough to run in milliseconds on a CPU, real enough for EPLB to move
their experts. Used by the demo, the tests and the benchmarks, and meant as
templates for model authors. ``tiny_qwen3_moe`` and ``tiny_qwen3_vl_moe`` build
tiny random-weight transformers models (transformers imported when called).
"""

from __future__ import annotations

from moe_protocols.models._config import (
    ModelConfigError,
    ModelInputError,
    TinyMoEConfig,
    TinyVLMConfig,
)
from moe_protocols.models._tiny_hf import tiny_qwen3_moe, tiny_qwen3_vl_moe
from moe_protocols.models._tiny_moe import (
    TinyDenseMLP,
    TinyMoEBlock,
    TinyMoEForCausalLM,
    grouped_topk,
    tiny_moe,
)
from moe_protocols.models._tiny_vlm import (
    TinyProxyVLMForConditionalGeneration,
    TinyVisionTower,
    TinyVLMForConditionalGeneration,
    tiny_proxy_vlm,
    tiny_vlm,
)

__all__ = [
    "ModelConfigError",
    "ModelInputError",
    "TinyDenseMLP",
    "TinyMoEBlock",
    "TinyMoEConfig",
    "TinyMoEForCausalLM",
    "TinyProxyVLMForConditionalGeneration",
    "TinyVLMConfig",
    "TinyVLMForConditionalGeneration",
    "TinyVisionTower",
    "grouped_topk",
    "tiny_moe",
    "tiny_proxy_vlm",
    "tiny_qwen3_moe",
    "tiny_qwen3_vl_moe",
    "tiny_vlm",
]
